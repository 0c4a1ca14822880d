"""What the worker's Python fan-out path costs per delivery, in one process.

No sockets and no Redis: a hub with `--players` sessions following three of
`--topics` topics each, fed two events a loop turn, each session writing its
frames to nothing. What is left is the path every delivery takes through the
hub, the channel, the fan-out and the session (gateway/fanout.py); its CPU per
delivery is what an A/B of a change to that path compares:

    python -m bench.fanout_cost                    # this checkout
    python -m bench.fanout_cost --tree /tmp/old     # a `git worktree` of another commit

It drives the hub through `hold`/`loaded`/`join` (the plain hub), or through
the older channel install for trees from before it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path


def _open(hub, topic: str):
    if hasattr(hub, "hold"):  # the plain hub (gateway/effects.py)
        from gateway.broker import TopicState

        channel, _ = hub.hold(topic)
        hub.loaded(channel, TopicState("e", 0, []))
        return channel
    from gateway.channel import TopicChannel  # before it: install by hand

    channel = TopicChannel(topic, 512)
    hub.channels[topic] = channel
    hub._install(channel, "e", 0, [])
    channel.ready.set_result(None)
    channel.joining += 1
    return channel


async def measure(players: int, topics: int, turns: int, seed: int) -> tuple[int, float]:
    import orjson

    from gateway.counters import WorkerCounters
    from gateway.fanout import Fanout
    from gateway.hub import Hub
    from gateway.session import Session

    counters = WorkerCounters()
    fanout = Fanout(counters, max_batch=256, slice=128)
    hub = Hub(fanout, counters=counters)
    names = [f"odds:5:{i}" for i in range(topics)]
    channels = {t: _open(hub, t) for t in names}
    rng = random.Random(seed)
    for i in range(players):
        session = Session(f"c{i}", player="p", write=lambda p: None,
                          write_frame=lambda f: None, scheduler=fanout, counters=counters)
        for topic in rng.sample(names, 3):
            channels[topic].joining += 1
            hub.join(session, channels[topic], None)
    await asyncio.sleep(0)
    seqs = dict.fromkeys(names, 0)
    cpu0, delivered0 = time.process_time(), counters.deliveries
    for _ in range(turns):
        for _ in range(2):
            topic = rng.choice(names)
            seqs[topic] += 1
            hub.on_message(topic, orjson.dumps({
                "type": "odds", "topic": topic, "epoch": "e", "seq": seqs[topic],
                "market": "5:8:1", "ts": time.time_ns(), "prices": {"home": "1.00"}}))
        for _ in range(100):  # the fan-out's slices, one loop iteration each
            await asyncio.sleep(0)
    return counters.deliveries - delivered0, time.process_time() - cpu0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, help="run the gateway of this checkout")
    parser.add_argument("--players", type=int, default=5000)
    parser.add_argument("--topics", type=int, default=50)
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tree is not None:
        sys.path.insert(0, str(args.tree.resolve()))
        for name in [m for m in sys.modules if m == "gateway" or m.startswith("gateway.")]:
            del sys.modules[name]
    delivered, cpu_s = asyncio.run(measure(args.players, args.topics, args.turns, args.seed))
    print(f"{delivered} deliveries, {1e6 * cpu_s / delivered:.3f} us CPU per delivery")
    return 0


if __name__ == "__main__":
    sys.exit(main())
