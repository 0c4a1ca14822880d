"""`/t/` through a real node's HAProxy: to the workers' click listeners, over kept-alive
connections, never to a draining or dead worker (haproxy/oddsgate.cfg.tmpl, backend clicks)."""

from __future__ import annotations

import http.client
import os
import signal
import time

import pytest
import redis

from attribution import keys
from attribution.clicks import parse_record
from attribution.link_store import LinkStore
from attribution.links import Link
from tests.node_harness import start_node


def stat(node, backend: str) -> dict[str, dict[str, str]]:
    return node.haproxy_stat(backend)


def clicks(node, count: int) -> list[int]:
    """`count` clicks, each on its own client connection, as a browser's would be."""
    statuses = []
    for i in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", node.frontend_port, timeout=10)
        try:
            conn.request("GET", f"/t/route?sub1=r{i}", headers={"User-Agent": "Mozilla/5.0"})
            statuses.append(conn.getresponse().status)
        finally:
            conn.close()
    return statuses


def served(node) -> dict[str, int]:
    return {name: int(row["stot"]) for name, row in stat(node, "clicks").items()
            if name != "BACKEND"}


@pytest.fixture
def node(redis_server, tmp_path):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    LinkStore(client).add(Link.create("route", "p1", "c1", "r1", "https://dest.example/",
                                      subids=True))
    client.close()
    started = start_node(redis_server.url, tmp_path / "node", workers=2,
                         OG_CLICK_KEYS="k1:routing-test-secret-0001")
    started.wait(lambda: {row["status"] for name, row in stat(started, "clicks").items()
                          if name != "BACKEND"} == {"UP"}, what="click servers UP")
    yield started
    assert started.stop() == 0, started.log()[-2000:]


def test_clicks_go_to_the_click_listeners_over_kept_alive_connections(node) -> None:
    gateway_before = int(stat(node, "gateway")["BACKEND"]["stot"])
    assert clicks(node, 40) == [302] * 40
    per_server = served(node)
    assert sum(per_server.values()) == 40 and all(n > 0 for n in per_server.values())
    backend = stat(node, "clicks")["BACKEND"]
    # a connection per click on the client side, far fewer on the workers' side
    assert int(backend["reuse"]) > 20, backend
    assert int(stat(node, "gateway")["BACKEND"]["stot"]) == gateway_before


def test_a_draining_worker_gets_no_clicks_and_gets_them_again_after(node) -> None:
    reply = node.command(cmd="drain", worker=0)
    assert reply["ok"]
    node.wait(lambda: stat(node, "clicks")["c0"]["status"].startswith("DRAIN"), 5,
              "c0 drained with w0")
    before = served(node)
    assert clicks(node, 20) == [302] * 20
    after = served(node)
    assert after["c0"] == before["c0"] and after["c1"] == before["c1"] + 20
    assert node.command(cmd="undrain", worker=0)["ok"]
    node.wait(lambda: stat(node, "clicks")["c0"]["status"] == "UP", 5, "c0 back with w0")
    assert clicks(node, 20) == [302] * 20
    assert served(node)["c0"] > after["c0"]


def test_a_dead_workers_clicks_go_to_the_others(node) -> None:
    assert clicks(node, 10) == [302] * 10  # HAProxy holds connections to both listeners
    os.kill(node.worker_pids()[0], signal.SIGKILL)
    started = time.monotonic()
    statuses = []
    while time.monotonic() - started < 2.0:  # before and after HAProxy marks it DOWN
        statuses += clicks(node, 5)
    assert set(statuses) == {302}, statuses


def test_clicks_during_a_reload_are_all_answered_and_recorded(node, redis_server) -> None:
    """A reload starts each worker's successor on the same ports (SO_REUSEPORT) and
    retires the old one, whose click connections HAProxy held: they close after their
    next answer (Connection: close while draining), so no click is refused or lost."""
    import threading

    before = node.worker_pids()
    statuses: list[int] = []
    done = threading.Event()

    def keep_clicking() -> None:
        while not done.is_set():
            statuses.extend(clicks(node, 5))

    clicker = threading.Thread(target=keep_clicking)
    clicker.start()
    try:
        result = node.cli("reload", "--timeout", "30", timeout=120)
    finally:
        done.set()
        clicker.join()
    assert result.returncode == 0, result.stderr + result.stdout
    assert all(a != b for a, b in zip(before, node.worker_pids(), strict=True))
    assert len(statuses) > 20 and set(statuses) == {302}, statuses
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.xlen(keys.CLICKS) >= len(statuses)
    finally:
        client.close()


def test_the_client_address_is_haproxys_last_forwarded_for_entry(node, redis_server) -> None:
    """A client cannot choose its address (and so dodge the duplicate verdict) by sending
    its own X-Forwarded-For: HAProxy appends the real one, the last entry is believed."""
    for forwarded in (None, "203.0.113.9", "198.51.100.4"):
        conn = http.client.HTTPConnection("127.0.0.1", node.frontend_port, timeout=10)
        headers = {"User-Agent": "Mozilla/5.0 xff"}
        if forwarded:
            headers["X-Forwarded-For"] = forwarded
        conn.request("GET", "/t/route", headers=headers)
        assert conn.getresponse().status == 302
        conn.close()
    client = redis.Redis.from_url(redis_server.url)
    try:
        rows = [parse_record(fields[b"c"]) for _, fields in client.xrange(keys.CLICKS)]
    finally:
        client.close()
    assert [r["verdict"] for r in rows] == ["ok", "duplicate", "duplicate"]
    assert len({r["ip_hash"] for r in rows}) == 1
