"""`kill -9` of a worker during a click storm through HAProxy loses no click that got its 302.

The storm's client keeps every click id it was redirected with (from
`Location`); after a worker is killed mid-storm, each of them must be in
`og:clicks`: a 302 leaves only once its click is recorded (PROTOCOL.md §9).
The clicks go through HAProxy's `clicks` backend to the workers' click
listeners (gateway/clicklistener.py), over connections HAProxy keeps alive.
"""

from __future__ import annotations

import asyncio
import os
import signal
from urllib.parse import parse_qs, urlsplit

import redis

from attribution import keys
from attribution.clicks import parse_record
from attribution.link_store import LinkStore
from attribution.links import Link
from tests.node_harness import start_node

CLICKERS = 16
STORM_S = 4.0


async def click(port: int, path: str, index: int) -> tuple[int, str | None]:
    """One GET through HAProxy: (status, click id of a 302)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path}?sub1=c{index} HTTP/1.1\r\nHost: t\r\n"
                     f"User-Agent: Mozilla/5.0 storm-{index}\r\nConnection: close\r\n\r\n"
                     .encode())
        head = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n\r\n", 1)[0]
    finally:
        writer.close()
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    location = next((line.split(":", 1)[1].strip() for line in lines[1:]
                     if line.lower().startswith("location:")), None)
    if status != 302 or location is None:
        return status, None
    return status, parse_qs(urlsplit(location).query)["ogclid"][0]


async def test_kill_9_during_a_click_storm_loses_no_redirected_click(redis_server,
                                                                     tmp_path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    LinkStore(client).add(Link.create("storm", "p1", "c1", "r1", "https://dest.example/",
                                      subids=True))
    node = start_node(redis_server.url, tmp_path / "node", workers=2,
                      OG_CLICK_KEYS="k1:storm-test-secret-00001", OG_HEARTBEAT_TIMEOUT_S="3")
    redirected: list[str] = []
    statuses: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STORM_S

    async def clicker(index: int) -> None:
        while loop.time() < deadline:
            try:
                status, click_id = await click(node.frontend_port, "/t/storm", index)
            except (TimeoutError, OSError, ValueError, IndexError):
                statuses[0] = statuses.get(0, 0) + 1  # cut off: no 302, nothing owed
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if click_id is not None:
                redirected.append(click_id)

    try:
        storm = asyncio.gather(*(clicker(i) for i in range(CLICKERS)))
        await asyncio.sleep(STORM_S / 3)
        before = len(redirected)
        victim = node.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        await storm
        through_listeners = int(node.haproxy_stat("clicks")["BACKEND"]["stot"])
    finally:
        assert node.stop() == 0, node.log()[-2000:]
    recorded = {parse_record(fields[b"c"])["click_id"]
                for _, fields in client.xrange(keys.CLICKS)}
    client.close()
    assert before > 0 and len(redirected) > before, statuses  # clicks before and after
    assert through_listeners >= len(redirected)  # every 302 came from a click listener
    missing = [click_id for click_id in redirected if click_id not in recorded]
    assert missing == [], f"{len(missing)} of {len(redirected)} redirected clicks not recorded"
    assert len(set(redirected)) == len(redirected)
