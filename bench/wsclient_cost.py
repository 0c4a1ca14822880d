"""What the load generator's WebSocket client costs per event, A/B between commits.

The load generator is the ceiling of the bench on big machines, so a change
of its client (bench/wsclient.py) is judged by the client's own CPU per
event, nothing else. This runs a server in this process and the clients in
a child process, and reports the child's CPU-seconds (user + system, from
`getrusage`) per million events it received and checked:

- The server (websockets' sans-I/O `ServerProtocol` for the handshake and
  the subscribe; pre-encoded frames written straight to the transports, as
  a worker writes the same bytes to every follower) pushes `--frames`
  frames of `--events-per-frame` odds events (PROTOCOL.md's event shape, as
  feed/events.py writes it; one `odds` frame, or a `batch`) to each of
  `--clients` clients over loopback.
- It writes one frame to every client, then waits for the next round, at
  `--rate` frames a second in all: a client is not backlogged, so each read
  holds about one frame, as in the bench's steady scenario (a backlogged
  client would get several frames per read and look cheaper than it is).
- `--layer full` (default) measures `bench.adapters.OddsgateConn`: framing,
  one `orjson.loads` per frame, the §5 check and the histogram per event,
  what the bench paid before sampling (and still pays per checked player).
  `--layer sampled` is what steady and saturation pay now: `--check-share`
  (default `bench.adapters.CHECK_SHARE`) of the clients checked, the others
  counting events in the bytes (`OddsgateConn(checked=False)`); a tree from
  before sampling checks every client. `--layer counted`: none checked.
  `--layer framing` measures the WebSocket client alone (an `on_message`
  that counts).
- The table also says what one load-generator process can drive at 100% of
  one core at that cost: frames/s and deliveries/s (events/s) per CPU-second.
- `--before REV` runs the same clients from REV's bench/ (`git archive`, this
  file copied in) alternately with the working tree's, `--repeat` times each;
  the table gives the median and the range.

    .venv/bin/python -m bench.wsclient_cost --before HEAD   # uncommitted edits vs the last commit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import uvloop
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

ROOT = Path(__file__).resolve().parent.parent
CHECK_SHARE = 0.1  # bench.adapters.CHECK_SHARE (not imported: --before trees predate it)
TOPIC = "odds:1:39"
EPOCH = "r1-20261127"
MARKETS = 12


# -- the server (this process) --------------------------------------------------


def event_frames(frames: int, per_frame: int) -> list[bytes]:
    """`frames` server frames carrying seq 1.. in order on TOPIC, encoded once."""
    ts = time.time_ns()
    out = []
    seq = 0
    for _ in range(frames):
        events = []
        for _ in range(per_frame):
            seq += 1
            m = seq % MARKETS
            events.append(orjson.dumps({
                "type": "odds", "topic": TOPIC, "epoch": EPOCH, "seq": seq,
                "market": f"1:39:{m}", "event_id": f"m-1-39-{m}", "ts": ts,
                "status": "open",
                "prices": {"home": f"{1.5 + m / 100:.2f}", "draw": "3.40",
                           "away": f"{4.2 - m / 100:.2f}"}}))
        payload = events[0] if per_frame == 1 else (
            b'{"type":"batch","events":[' + b",".join(events) + b"]}")
        out.append(Frame(Opcode.TEXT, payload).serialize(mask=False))
    return out


class _Player(asyncio.Protocol):
    """The server side of one client: handshake, welcome, subscribe, then pushed frames."""

    def __init__(self, opened: list[_Player]) -> None:
        self.opened = opened
        self.proto = ServerProtocol(max_size=2**16)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Request):
                proto.send_response(proto.accept(event))
                proto.send_text(orjson.dumps({"type": "welcome", "worker": 0}))
                self.opened.append(self)
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                msg = orjson.loads(event.data)
                if msg.get("op") == "subscribe":
                    topics = list(msg["topics"])
                    proto.send_text(orjson.dumps(
                        {"type": "subscribed", "id": msg.get("id"), "topics": topics}))
                    for topic in topics:
                        proto.send_text(orjson.dumps(
                            {"type": "snapshot", "topic": topic, "epoch": EPOCH, "seq": 0,
                             "markets": []}))
        assert self.transport is not None
        for out in proto.data_to_send():
            if out:
                self.transport.write(out)
            else:
                self.transport.close()


async def _push(players: list[_Player], frames: list[bytes], rate: float) -> None:
    """One frame to every player per round, rounds spaced to hold `rate` frames/s."""
    loop = asyncio.get_running_loop()
    interval = len(players) / rate
    start = loop.time()
    for n, frame in enumerate(frames):
        for player in players:
            if player.transport is not None:
                player.transport.write(frame)
        delay = start + (n + 1) * interval - loop.time()
        await asyncio.sleep(max(0.0, delay))


@dataclass
class Run:
    impl: str
    layer: str
    per_frame: int
    cpu_s: float
    events: int
    frames: int

    @property
    def per_million(self) -> float:
        return self.cpu_s / self.events * 1e6


async def _one_run(tree: Path, impl: str, args: argparse.Namespace, layer: str,
                   per_frame: int) -> Run:
    opened: list[_Player] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Player(opened), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    frames = event_frames(args.frames, per_frame)
    env = dict(os.environ, PYTHONPATH=str(tree))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.wsclient_cost", "--role", "client", "--port", str(port),
        "--clients", str(args.clients), "--layer", layer,
        "--check-share", str(args.check_share),
        "--expect", str(args.frames * (per_frame if layer != "framing" else 1)),
        cwd=tree, env=env, stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    try:
        ready = await asyncio.wait_for(child.stdout.readline(), 60)
        if ready.strip() != b"ready":
            raise RuntimeError(f"client did not get ready: {ready!r}")
        await _push(opened, frames, args.rate)
        result = json.loads(await asyncio.wait_for(child.stdout.readline(), 120))
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
        server.close()
        for player in opened:
            if player.transport is not None:
                player.transport.abort()
    if result["violations"]:
        raise RuntimeError(f"{impl}: the client saw violations: {result}")
    events = result["events"] * (1 if layer != "framing" else per_frame)  # framing counts frames
    return Run(impl, layer, per_frame, result["cpu_s"], events, result["frames"])


def _export(rev: str, into: Path) -> str:
    """REV's bench/ under `into`, with this file added (REV may predate it)."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "bench"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.copy(Path(__file__), into / "bench" / "wsclient_cost.py")
    return commit


async def _compare(args: argparse.Namespace) -> list[Run]:
    trees = {"working tree": ROOT}
    with tempfile.TemporaryDirectory(prefix="wsclient-cost-") as tmp:
        if args.before:
            trees = {_export(args.before, Path(tmp)): Path(tmp), **trees}
        runs = []
        for layer in args.layer:
            for per_frame in args.events_per_frame:
                for _ in range(args.repeat):
                    for impl, tree in trees.items():
                        run = await _one_run(tree, impl, args, layer, per_frame)
                        print(f"  {layer:8} {per_frame:3} ev/frame  {impl:14} "
                              f"{run.per_million:6.2f} CPU-s per million events",
                              file=sys.stderr)
                        runs.append(run)
        return runs


def table(runs: list[Run]) -> str:
    """Median (min-max) CPU-s per million events, and per frame, by layer and batch size;
    and what one process drives at that cost on one whole core."""
    lines = ["| layer | events/frame | client | CPU-s per million events | µs per frame "
             "| one process drives: frames/s | deliveries/s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    keys = dict.fromkeys((r.layer, r.per_frame, r.impl) for r in runs)
    for layer, per_frame, impl in keys:
        costs = sorted(r.per_million for r in runs
                       if (r.layer, r.per_frame, r.impl) == (layer, per_frame, impl))
        med = statistics.median(costs)
        frames_s, events_s = drives(med, per_frame)
        lines.append(f"| {layer} | {per_frame} | {impl} | {med:.2f} "
                     f"({costs[0]:.2f}-{costs[-1]:.2f}) | {med * per_frame:.2f} "
                     f"| {frames_s:,.0f} | {events_s:,.0f} |")
    return "\n".join(lines)


def drives(cpu_s_per_million_events: float, per_frame: int) -> tuple[float, float]:
    """(frames/s, events/s) one process reads on one whole core at this cost."""
    if cpu_s_per_million_events <= 0:
        return 0.0, 0.0
    events_s = 1e6 / cpu_s_per_million_events
    return events_s / per_frame, events_s


# -- the clients (child process, run from the tree under test) ------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _clients(port: int, count: int, layer: str, expect: int,
                   check_share: float = 1.0) -> dict:
    import inspect

    from bench.adapters import OddsgateConn
    from bench.counters import Counters
    from bench.wsclient import WsClient

    loop = asyncio.get_running_loop()
    counters = Counters()
    frames = [0]

    class Counting(WsClient):
        def __init__(self) -> None:
            super().__init__("127.0.0.1", port, "/ws")
            self.ready = loop.create_future()

        def on_open(self) -> None:
            self.ready.set_result(None)

        def on_message(self, payload: bytes) -> None:
            frames[0] += 1

    share = {"full": 1.0, "sampled": check_share, "counted": 0.0}.get(layer, 1.0)
    # a tree from before sampling (--before) checks every client
    can_sample = "checked" in inspect.signature(OddsgateConn.__init__).parameters

    def player(i: int) -> OddsgateConn:
        if not can_sample:
            return OddsgateConn("127.0.0.1", port, counters, [TOPIC])
        from bench.adapters import is_checked
        return OddsgateConn("127.0.0.1", port, counters, [TOPIC],
                            checked=is_checked(i, share))

    conns = []
    for i in range(count):
        if layer != "framing":
            _, conn = await loop.create_connection(
                lambda i=i: player(i), "127.0.0.1", port)
            await conn.ready
            conn.subscribe()
            await conn.synced
        else:
            _, conn = await loop.create_connection(Counting, "127.0.0.1", port)
            await conn.ready
        conns.append(conn)
    frames[0] = 0
    counters.reset()
    total = expect * count
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    cpu0 = _cpu()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = counters.deliveries if layer != "framing" else frames[0]
        if got >= total:
            break
        await asyncio.sleep(0.02)
    cpu = _cpu() - cpu0
    events = counters.deliveries if layer != "framing" else frames[0]
    for conn in conns:
        conn.abort()
    return {"cpu_s": cpu, "events": events, "frames": counters.frames or frames[0],
            "violations": dict(counters.violations) if events >= total else {"missing": total}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="also run the clients of this commit, alternately")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--frames", type=int, default=500, help="frames pushed to each client")
    parser.add_argument("--events-per-frame", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rate", type=float, default=20_000, help="frames/s, all clients")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layer", nargs="+", choices=["full", "sampled", "counted", "framing"],
                        default=["full"])
    parser.add_argument("--check-share", type=float, default=CHECK_SHARE,
                        help="share of clients checked in --layer sampled")
    parser.add_argument("--role", choices=["server", "client"], default="server",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "client":
        result = uvloop.run(_clients(args.port, args.clients, args.layer[0], args.expect,
                                     args.check_share))
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    print(table(uvloop.run(_compare(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
