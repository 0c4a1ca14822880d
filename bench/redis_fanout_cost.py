"""What Redis spends per pub/sub message delivered to a subscriber, and per publish.

docs/scaling.md sizes the Redis tier from this: with W workers (or nodes)
subscribed to a topic, every event costs Redis one publish plus W deliveries,
and with sharded pub/sub a topic's whole fan-out falls on one shard (its
master and the replicas its subscribers read from). This measures both costs
on a private `redis-server` over loopback:

- `subscribers` connections SSUBSCRIBE one shard channel (SUBSCRIBE with
  `--classic`) and read everything (a child process, so their reading does not
  share the publisher's core);
- the publisher sends `--messages` SPUBLISHes of an event-sized payload
  (`--bytes`, default 210: an odds event as the synthetic feed's publish script
  writes it), pipelined `--pipeline` at a time;
- Redis's own CPU (user + system, from /proc) is read before and after.

Each subscriber count runs `--repeat` times (alternately); the cost per
delivery is the slope of Redis CPU against subscribers (least squares over
every run), the cost per publish its intercept. Loopback: each delivery's
`write()` also runs the receiver's TCP input, charged partly to Redis's core
(softirq), so this is an upper bound on what a NIC would cost Redis.

    .venv/bin/python -m bench.redis_fanout_cost --subscribers 1 8 32 --messages 50000
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from supervisor.embedded_redis import EmbeddedRedis

CHANNEL = "{odds:1:2:14}"  # hash-tagged as a topic's keys would be


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def _subscribers(port: int, count: int, command: bytes, expect_bytes: int,
                 ready: multiprocessing.synchronize.Event, done: multiprocessing.Queue) -> None:
    """`count` subscribers, read until each got `expect_bytes` after its confirmation."""
    import selectors

    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(_resp(command, CHANNEL.encode()))
        confirm = b""
        while confirm.count(b"\r\n") < 6:  # *3, $kind, kind, $channel, channel, :1
            confirm += sock.recv(4096)
        sock.setblocking(False)
        socks.append(sock)
        sel.register(sock, selectors.EVENT_READ, [0])
    ready.set()
    left = count
    deadline = time.monotonic() + 300
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            got = key.data
            with contextlib.suppress(BlockingIOError):
                chunk = key.fileobj.recv(1 << 18)
                got[0] += len(chunk)
                if got[0] >= expect_bytes:
                    sel.unregister(key.fileobj)
                    left -= 1
    done.put(left)
    for sock in socks:
        sock.close()


def _redis_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def one_run(redis: EmbeddedRedis, subscribers: int, messages: int, size: int,
            pipeline: int, classic: bool) -> float:
    """Redis CPU-seconds for `messages` publishes to `subscribers` readers."""
    publish, subscribe = (b"PUBLISH", b"SUBSCRIBE") if classic else (b"SPUBLISH", b"SSUBSCRIBE")
    payload = b"x" * size
    message = _resp(b"smessage" if not classic else b"message", CHANNEL.encode(), payload)
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_subscribers, args=(
        redis.port, subscribers, subscribe, len(message) * messages - 64, ready, done))
    child.start()
    if not ready.wait(60):
        child.kill()
        raise RuntimeError("subscribers did not get ready")
    pub = socket.create_connection(("127.0.0.1", redis.port))
    batch = _resp(publish, CHANNEL.encode(), payload) * pipeline
    replies = 0
    cpu0 = _redis_cpu(redis.pid)
    sent = 0
    while sent < messages:
        n = min(pipeline, messages - sent)
        pub.sendall(batch if n == pipeline else _resp(publish, CHANNEL.encode(), payload) * n)
        sent += n
        want = sent
        while replies < want:
            replies += pub.recv(1 << 16).count(b"\n")
    left = done.get(timeout=300)
    cpu = _redis_cpu(redis.pid) - cpu0
    child.join(10)
    pub.close()
    if left:
        raise RuntimeError(f"{left} subscribers did not get every message")
    return cpu


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares: (intercept, slope) of y over x."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--bytes", type=int, default=210)
    parser.add_argument("--pipeline", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--classic", action="store_true", help="PUBLISH/SUBSCRIBE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="redis-fanout-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", port=0)
        redis.start()
        try:
            points = []
            for _ in range(args.repeat):
                for subs in args.subscribers:
                    cpu = one_run(redis, subs, args.messages, args.bytes, args.pipeline,
                                  args.classic)
                    us = cpu / args.messages * 1e6
                    print(f"  {subs:4} subscribers: {us:7.2f} us of Redis CPU per publish",
                          file=sys.stderr)
                    points.append((subs, us))
        finally:
            redis.stop()
    intercept, slope = fit(points)
    kind = "PUBLISH/SUBSCRIBE" if args.classic else "SPUBLISH/SSUBSCRIBE"
    print(f"| {kind}, {args.bytes}-byte messages | us per publish (no subscriber) | "
          f"us per delivery to a subscriber | deliveries per Redis core-second |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| {len(points)} runs, {args.messages:,} messages each, subscribers "
          f"{' '.join(map(str, args.subscribers))} | {intercept:.2f} | {slope:.3f} | "
          f"{(1e6 / slope if slope > 0 else 0):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
