"""Load-generator processes: many connections each, driven over a pipe.

The orchestrator starts several of these (multiprocessing 'spawn'), gives
each its share of the planned connections (a global index and the topics it
follows), and then sends commands: connect, subscribe, reset (start a
measurement interval), stats, stall, wake, drop, close. Every reply is a plain
dict. Connections are spread over the target endpoints (worker ports, or
one HAProxy frontend) and over several loopback source addresses, so
50,000 connections do not run out of ephemeral ports. Through a node's
HAProxy every player carries its own `og_session` cookie (a token signed
with the target's secret, the same one across reconnects).

`follow_hints` makes oddsgate players follow `reconnect` hints (PROTOCOL.md
§4): after `after_ms` the player connects again to the same endpoint and
resumes every topic from its last seq (`bench.adapters.Move` records how it
went; `moves` returns the records). Off by default: a server that stops at
the end of a run also sends hints, and nobody should come back then.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import socket
import time
import traceback
from dataclasses import dataclass

import psutil
import uvloop

from bench.adapters import PROTOCOLS, BenchConn, Move, OddsgateConn, Wake, is_checked
from bench.counters import Counters
from client.odds import backoff_delay
from gateway.auth import COOKIE_NAME, issue_token

CONNECT_TIMEOUT_S = 15.0
TOKEN_TTL_S = 4 * 3600.0


@dataclass
class LoadSpec:
    protocol: str  # a key of bench.adapters.PROTOCOLS
    endpoints: list[tuple[str, int]]  # (host, port) to spread connections over
    sources: list[str]  # loopback source addresses
    plans: list[tuple[int, list[str]]]  # (global connection index, topics)
    token_secret: str | None = None  # players send an og_session cookie signed with it
    # share of players checked (§5, latency; bench.adapters.is_checked); the others count
    check_share: float = 1.0


class LoadGen:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.conn_class: type[BenchConn] = PROTOCOLS[spec.protocol]
        self.counters = Counters()
        self.conns: dict[int, BenchConn] = {}
        self.connect_failures: dict[str, int] = {}
        self.subscribed: set[int] = set()
        self.warmers: list[BenchConn] = []
        self.follow_hints = False
        self.moves: dict[int, Move] = {}  # player index -> its latest move
        self.wakes: dict[int, Wake] = {}  # stalled player index -> since it read again
        self._moving: set[asyncio.Task] = set()
        self._tokens: dict[int, str] = {}
        self.proc = psutil.Process()
        self._mark_cpu = self._cpu()
        self._mark_wall = time.monotonic()

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    # -- commands ---------------------------------------------------------

    async def cmd_connect(self, upto: int | None = None, concurrency: int = 32,
                          deadline_s: float = 120.0) -> dict:
        """Open the planned connections with index < `upto` not open yet."""
        todo = [(i, topics) for i, topics in self.spec.plans
                if i not in self.conns and (upto is None or i < upto)]
        feed = iter(todo)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = started + deadline_s

        async def opener() -> None:
            for index, topics in feed:
                if time.monotonic() > deadline:
                    self._fail("bench deadline")
                    continue
                await self._open(loop, index, topics)

        workers = [asyncio.create_task(opener()) for _ in range(max(1, concurrency))]
        await asyncio.gather(*workers)
        return {
            "attempted": len(todo),
            "open": len(self.conns),
            "seconds": time.monotonic() - started,
            "failures": dict(self.connect_failures),
        }

    async def _open(self, loop: asyncio.AbstractEventLoop, index: int, topics: list[str]) -> None:
        t0 = time.perf_counter_ns()
        try:
            conn = await self._connect(loop, index, topics)
        except (OSError, ConnectionError, TimeoutError) as exc:
            self._fail(_why(exc))
            return
        self.counters.connect.record((time.perf_counter_ns() - t0) // 1000)
        self.conns[index] = conn

    async def _connect(self, loop: asyncio.AbstractEventLoop, index: int,
                       topics: list[str]) -> BenchConn:
        """One player's connection, usable (greeted) when it returns."""
        host, port = self.spec.endpoints[index % len(self.spec.endpoints)]
        source = self.spec.sources[index % len(self.spec.sources)]
        conn: BenchConn | None = None

        def made() -> BenchConn:
            nonlocal conn
            conn = self.conn_class(host, port, self.counters, topics,
                                   is_checked(index, self.spec.check_share))
            conn.index = index
            if self.spec.token_secret:
                conn.extra_headers = {"Cookie": f"{COOKIE_NAME}={self._token(index)}"}
            if self.follow_hints and isinstance(conn, OddsgateConn):
                conn.on_hint = self._on_hint
            return conn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((source, 0))
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT_S)
            await loop.create_connection(made, sock=sock)
            assert conn is not None
            await asyncio.wait_for(asyncio.shield(conn.ready), CONNECT_TIMEOUT_S)
        except BaseException:
            if conn is not None:
                conn.wanted_open = False
                conn.abort()
            else:
                sock.close()
            raise
        return conn

    def _token(self, index: int) -> str:
        """The player's session cookie: the same one every time it connects."""
        token = self._tokens.get(index)
        if token is None:
            assert self.spec.token_secret
            token = issue_token(self.spec.token_secret, f"bench-{index}", f"s{index}",
                                TOKEN_TTL_S)
            self._tokens[index] = token
        return token

    # -- following reconnect hints ----------------------------------------

    def _on_hint(self, conn: OddsgateConn, after_ms: int, now_ns: int) -> None:
        if not self.follow_hints or self.conns.get(conn.index) is not conn:
            return
        conn.wanted_open = False  # the close that follows is expected
        move = Move(conn.index, conn.worker, after_ms, now_ns)
        self.moves[conn.index] = move
        loop = asyncio.get_running_loop()
        loop.call_later(after_ms / 1000, self._start_move, conn, move)

    def _start_move(self, old: OddsgateConn, move: Move) -> None:
        task = asyncio.get_running_loop().create_task(self._move(old, move))
        self._moving.add(task)
        task.add_done_callback(self._moving.discard)

    async def _move(self, old: OddsgateConn, move: Move) -> None:
        """Reconnect to the same endpoint and resume from what `old` held.

        A failed attempt is retried as the client library does (full-jitter
        backoff, client.odds.backoff_delay) until it works or the
        orchestrator stops following hints.
        """
        loop = asyncio.get_running_loop()
        while self.follow_hints:
            move.attempts += 1
            try:
                conn = await self._connect(loop, old.index, old.topics)
            except (OSError, ConnectionError, TimeoutError) as exc:
                move.failure = _why(exc)
                await asyncio.sleep(backoff_delay(move.attempts - 1))
                continue
            assert isinstance(conn, OddsgateConn)
            move.connected_ns = time.time_ns()
            move.to_worker = conn.worker
            move.failure = ""
            move.conn = conn
            conn.held = old.held  # the §5 check goes on across the move
            conn.move = move
            self.conns[old.index] = conn
            conn.resume()
            return

    async def cmd_follow_hints(self, on: bool = True) -> dict:
        """Follow hints from now on, or stop: moves still under way are abandoned.

        A player resumes from the last seq it checked: only checked players can."""
        if on and self.spec.check_share < 1.0:
            raise RuntimeError("following hints needs every player checked (check_share 1)")
        self.follow_hints = on
        for conn in self.conns.values():
            if isinstance(conn, OddsgateConn):
                conn.on_hint = self._on_hint if on else None
        if not on:
            for task in list(self._moving):
                task.cancel()
            for move in self.moves.values():
                if not move.resumed_ns:
                    move.abandoned = True
        return {"conns": len(self.conns)}

    async def cmd_moves(self, clear: bool = False, records: bool = True) -> dict:
        """The moves so far (and forget them with `clear`); counts always.

        `waiting`: hinted players neither resumed nor abandoned yet (their
        `after_ms` runs, they reconnect, or their resume is not complete)."""
        moves = list(self.moves.values())
        resumed = sum(1 for m in moves if m.resumed_ns)
        out = {
            "hinted": len(moves),
            "resumed": resumed,
            "waiting": sum(1 for m in moves if not m.resumed_ns and not m.abandoned),
            "last_due_ns": max((m.due_ns for m in moves), default=0),
        }
        if records:
            out["records"] = [m.record() for m in moves]
        if clear:
            self.moves.clear()
        return out

    async def cmd_workers(self) -> dict:
        """Open players per worker, as their `welcome` said."""
        counts: dict[str, int] = {}
        for conn in self.conns.values():
            if conn.open:
                key = str(getattr(conn, "worker", None))
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _fail(self, why: str) -> None:
        why = why[:120]
        self.connect_failures[why] = self.connect_failures.get(why, 0) + 1

    async def cmd_subscribe(self, per_second: float | None = None, wait_s: float = 60.0,
                            upto: int | None = None) -> dict:
        """Open, not yet subscribed connections (index < `upto`) subscribe; wait for them."""
        picked = [i for i, c in self.conns.items()
                  if i not in self.subscribed and c.open and (upto is None or i < upto)]
        todo = [self.conns[i] for i in picked]
        self.subscribed.update(picked)
        started = time.monotonic()
        if per_second:
            step = max(1, int(per_second / 100))
            for k in range(0, len(todo), step):
                for conn in todo[k : k + step]:
                    conn.subscribe()
                await asyncio.sleep(max(0.0, started + (k + step) / per_second
                                        - time.monotonic()))
        else:
            for conn in todo:
                conn.subscribe()
        futures = [c.synced for c in todo]
        if futures:
            await asyncio.wait(futures, timeout=wait_s)
        synced = sum(1 for f in futures if f.done() and not f.exception())
        return {"requested": len(todo), "synced": synced,
                "seconds": time.monotonic() - started}

    async def cmd_warm(self, topics: list[str], per_conn: int = 200, per_request: int = 40,
                       wait_s: float = 60.0, endpoints: list | None = None) -> dict:
        """Open every topic's channel before the crowd arrives, a few at a time.

        One connection per `per_conn` topics (a server's per-connection limit),
        subscribing `per_request` topics at a time and waiting for each batch; they
        stay open (and read) with their own counters, outside every measurement.
        `endpoints` (default: the target's) lets them reach each worker of a
        node straight, rather than wherever HAProxy would put them.
        """
        loop = asyncio.get_running_loop()
        counters = Counters()
        started = time.monotonic()
        synced = 0
        for k in range(0, len(topics), per_conn):
            for endpoint in endpoints or self.spec.endpoints:
                host, port = endpoint
                group = topics[k : k + per_conn]
                _, conn = await loop.create_connection(
                    lambda group=group, host=host, port=port: self.conn_class(
                        host, port, counters, group),
                    host, port)
                await asyncio.wait_for(asyncio.shield(conn.ready), CONNECT_TIMEOUT_S)
                self.warmers.append(conn)
                for j in range(0, len(group), per_request):
                    conn.topics = group[j : j + per_request]
                    conn.synced = loop.create_future()
                    conn.subscribe()
                    await asyncio.wait_for(asyncio.shield(conn.synced), wait_s)
                    synced += len(conn.topics)
        return {"topics": synced, "seconds": time.monotonic() - started,
                "errors": dict(counters.errors)}

    async def cmd_reset(self, subscribe: bool = False) -> dict:
        self.counters.reset()
        if subscribe:
            self.counters.subscribe.clear()
        self._mark_cpu = self._cpu()
        self._mark_wall = time.monotonic()
        return {}

    async def cmd_stats(self) -> dict:
        out = self.counters.to_dict()
        out["cpu_s"] = self._cpu() - self._mark_cpu
        out["wall_s"] = time.monotonic() - self._mark_wall
        out["open"] = sum(1 for c in self.conns.values() if c.open)
        out["checked_open"] = sum(1 for c in self.conns.values() if c.open and c.checked)
        out["rss"] = self.proc.memory_info().rss
        return out

    async def cmd_stall(self, indices: list[int]) -> dict:
        mine = [self.conns[i] for i in indices if i in self.conns]
        for conn in mine:
            conn.stalled = True
            conn.pause_reading()
        return {"stalled": len(mine)}

    async def cmd_wake(self, indices: list[int], heads: dict[str, dict[str, int]]) -> dict:
        """Stalled players read again; each one's `Wake` owes it `heads` (the feed's newest
        seq per market, at about this moment) for the topics it follows."""
        woken = 0
        for i in indices:
            conn = self.conns.get(i)
            if conn is None or not conn.stalled:
                continue
            wake = Wake.start(conn, heads, time.time_ns())
            self.wakes[i] = wake  # a closed one too: it never gets current
            if not conn.closed:
                conn.wake(wake)
            woken += 1
        return {"woken": woken}

    async def cmd_wakes(self, records: bool = True) -> dict:
        """The woken players so far: how many may still get to the current prices, and
        (`records`) what each was shown."""
        wakes = list(self.wakes.values())
        out: dict = {"woken": len(wakes), "waiting": sum(1 for w in wakes if w.waiting)}
        if records:
            out["records"] = [w.record() for w in wakes]
        return out

    async def cmd_drop(self, indices: list[int]) -> dict:
        """Cut connections off (no close handshake), as a vanished player would."""
        dropped = 0
        for i in indices:
            conn = self.conns.pop(i, None)
            if conn is not None:
                conn.wanted_open = False
                conn.abort()
                dropped += 1
        return {"dropped": dropped}

    async def cmd_close(self) -> dict:
        await self.cmd_follow_hints(on=False)
        for conn in [*self.conns.values(), *self.warmers]:
            conn.wanted_open = False
            conn.close()
        await asyncio.sleep(0.2)
        for conn in [*self.conns.values(), *self.warmers]:
            conn.abort()
        self.conns.clear()
        return {}


async def _serve(pipe: multiprocessing.connection.Connection, spec: LoadSpec) -> None:
    gen = LoadGen(spec)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: inbox.put_nowait(pipe.recv()))
    pipe.send(("ok", {"ready": True}))
    while True:
        name, kwargs = await inbox.get()
        try:
            result = await getattr(gen, f"cmd_{name}")(**kwargs)
            pipe.send(("ok", result))
        except Exception:
            pipe.send(("error", traceback.format_exc()))
        if name == "close":
            return


def process_main(pipe: multiprocessing.connection.Connection, spec: LoadSpec) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(pipe, spec))


class LoadGenError(RuntimeError):
    pass


class LoadGenPool:
    """The orchestrator's handle on the load-generator processes."""

    def __init__(self, specs: list[LoadSpec], start_timeout: float = 30.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[multiprocessing.connection.Connection] = []
        for n, spec in enumerate(specs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=process_main, args=(child, spec),
                               name=f"bench-loadgen-{n}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)
        self._collect(start_timeout)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def call(self, name: str, timeout: float = 60.0, per_process: list[dict] | None = None,
             **kwargs: object) -> list[dict]:
        for n, pipe in enumerate(self.pipes):
            args = dict(kwargs)
            if per_process is not None:
                args.update(per_process[n])
            pipe.send((name, args))
        return self._collect(timeout)

    def call_one(self, index: int, name: str, timeout: float = 60.0, **kwargs: object) -> dict:
        self.pipes[index].send((name, kwargs))
        if not self.pipes[index].poll(timeout):
            raise LoadGenError(f"load generator {index} did not answer within {timeout:.0f}s")
        status, value = self.pipes[index].recv()
        if status != "ok":
            raise LoadGenError(f"load generator {index} failed:\n{value}")
        return value

    def _collect(self, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        results = []
        for n, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise LoadGenError(f"load generator {n} did not answer within {timeout:.0f}s")
            status, value = pipe.recv()
            if status != "ok":
                raise LoadGenError(f"load generator {n} failed:\n{value}")
            results.append(value)
        return results

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("close", timeout=10.0)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)


def _why(exc: BaseException) -> str:
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def split_plans(plans: list[tuple[int, list[str]]], processes: int) -> list[list]:
    """Round-robin, so every process holds a fair share of every kind of connection."""
    shares: list[list] = [[] for _ in range(processes)]
    for plan, share in zip(plans, itertools.cycle(shares), strict=False):
        share.append(plan)
    return shares
