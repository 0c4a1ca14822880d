"""Several regions for tests (PROTOCOL.md §8): one feed for all, and a region's sudden death.

A region here is a node (or a worker) with its own Redis. What makes regions
interchangeable for a player is that they publish byte-identical streams;
`TwinFeed` gives the tests that, the way §8's deterministic aggregators do:
each event is published to every region's Redis by the contract's own
script, with one epoch and one body (`ts` included), so each region assigns
the same seq and stores the same bytes. It does not go through
`feed.publisher.Publisher`, whose epoch is a fresh random name per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import orjson
import psutil
import redis.asyncio as aioredis

from feed.events import PriceUpdate
from feed.publisher import DEFAULT_HISTORY_MS, new_epoch
from gateway.topics import PartitionMap
from redis_contract import DEFAULT_TOPIC_TTL_MS, PUBLISH_LUA, history_key, topic_keys
from tests.node_harness import Node


class TwinFeed:
    """Publishes every update to each region's Redis, identically.

    `published[topic]` lists the events as every region holds them, in seq
    order (the truth `client.rules.verify_coalescing` checks a player against).
    """

    def __init__(self, redis_urls: Iterable[str], epoch: str | None = None) -> None:
        self.clients = [aioredis.Redis.from_url(url) for url in redis_urls]
        self.scripts = [client.register_script(PUBLISH_LUA) for client in self.clients]
        self.epoch = epoch or new_epoch()
        self.pmap = PartitionMap.load(None)
        self.published: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def publish_many(self, updates: Iterable[PriceUpdate]) -> None:
        """Each update to every region, in order; the regions must agree on its seq."""
        for update in updates:
            update.validate(self.pmap)
            body = update.body()  # ts fixed here, once for every region
            args = [update.topic, self.epoch, update.market, body, DEFAULT_HISTORY_MS,
                    DEFAULT_TOPIC_TTL_MS]
            keys = topic_keys(update.topic)
            results = await asyncio.gather(*(script(keys=keys, args=args)
                                             for script in self.scripts))
            answers = {(_text(epoch), int(seq)) for epoch, seq, _published in results}
            if len(answers) != 1:
                raise AssertionError(f"regions disagree on {update.topic}: {answers}")
            [(epoch, seq)] = answers
            head = b'{"type":"odds","topic":"%s","epoch":"%s","seq":%d,' % (
                update.topic.encode(), epoch.encode(), seq)
            self.published[update.topic].append(orjson.loads(head + body))

    async def histories(self, topic: str) -> list[list[bytes]]:
        """Each region's stored events of `topic`, as bytes."""
        out = []
        for client in self.clients:
            entries = await client.xrange(history_key(topic))
            out.append([fields[b"e"] for _id, fields in entries])
        return out

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def kill_node(node: Node) -> None:
    """SIGKILL every process of `node` at once, by pid: its supervisor, workers
    and HAProxy (master and worker), as a machine or a region dies; nothing
    gets to send a ``reconnect``. Redis is the test's, not the node's, and
    lives on. The supervisor's multiprocessing resource tracker is left to
    exit by itself: it unlinks the node's shared-memory fleet table once its
    parent is gone."""
    root = psutil.Process(node.proc.pid)
    victims = [root, *(child for child in root.children(recursive=True)
                       if "resource_tracker" not in " ".join(child.cmdline()))]
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    node.proc.wait()
