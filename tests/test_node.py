"""A whole node (supervisor, workers, HAProxy, Redis) under the operations SREs run."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from client.odds import OddsClient
from feed.events import PriceUpdate
from feed.publisher import Publisher
from gateway.topics import PartitionMap
from redis_contract import latest_key, meta_key
from tests.conftest import ROOT, eventually, http_get, token
from tests.node_harness import Node, start_node, welcome_worker

TOPICS = [f"odds:1:39:{m}" for m in range(100, 106)]


@pytest.fixture(scope="module")
def node(redis_server, tmp_path_factory) -> Node:
    runtime = tmp_path_factory.mktemp("node")
    started = start_node(redis_server.url, runtime, OG_HEARTBEAT_TIMEOUT_S="3")
    yield started
    assert started.stop() == 0, started.log()[-2000:]


@pytest.fixture
async def feed(redis_server):
    """Publishes to TOPICS at ~200 events/s until the test ends."""
    client = aioredis.Redis.from_url(redis_server.url)
    publisher = Publisher(client, PartitionMap.load(None))
    stop = asyncio.Event()
    # Every market is listed before players follow it, as an aggregator does: a
    # topic's first publish would otherwise reset its early followers.
    await publisher.publish_many([
        PriceUpdate(t, t.split(":", 1)[1], f"m-{t.split(':', 1)[1]}", {"home": "2.00"})
        for t in TOPICS])

    async def run() -> None:
        rng = random.Random(3)
        while not stop.is_set():
            batch = []
            for _ in range(4):
                topic = rng.choice(TOPICS)
                market = topic.split(":", 1)[1]
                batch.append(PriceUpdate(topic, market, f"m-{market}",
                                         {"home": f"{rng.uniform(1.01, 9):.2f}"}))
            with contextlib.suppress(aioredis.ConnectionError):
                await publisher.publish_many(batch)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(run())

    async def halt() -> None:
        stop.set()
        await task

    yield halt
    await halt()
    await client.aclose()


async def _players(node: Node, count: int, topics_each: int = 2) -> list[OddsClient]:
    rng = random.Random(count)
    players = []
    for i in range(count):
        player = OddsClient(node.url, token=token(f"p{i}", f"s{i}-{rng.random()}"))
        await player.connect()
        topics = rng.sample(TOPICS, topics_each)
        result = await player.subscribe(topics)
        assert result.accepted == topics
        players.append(player)
    await asyncio.gather(*(p.wait_synced(p.subscriptions) for p in players))
    return players


async def _assert_consistent(players: list[OddsClient], redis_url: str, halt_feed) -> None:
    """Once the feed stops, every player holds Redis' newest state, with no §5 violation."""
    await halt_feed()
    client = aioredis.Redis.from_url(redis_url)
    heads = {}
    for topic in TOPICS:
        epoch, seq = await client.hmget(meta_key(topic), "epoch", "seq")
        heads[topic] = (epoch.decode(), int(seq)) if epoch else None
        latest = await client.hgetall(latest_key(topic))
        heads[topic] = (heads[topic], {k.decode(): v for k, v in latest.items()})
    await client.aclose()
    for player in players:
        for topic in player.subscriptions:
            (epoch, seq), _latest = heads[topic]
            await eventually(lambda p=player, t=topic, s=seq: p.topics[t].seq == s, timeout=15)
            assert player.topics[topic].epoch == epoch
        assert player.violations == [], player.violations[:3]


async def _close(players: list[OddsClient]) -> None:
    await asyncio.gather(*(p.close() for p in players))


async def test_a_session_always_reaches_the_same_worker_and_sessions_spread(node) -> None:
    seen: collections.Counter[int] = collections.Counter()
    for i in range(30):
        cookie = {"Cookie": f"og_session={token(f'spread{i}', f'sid{i}')}"}
        workers = set()
        for _ in range(3):
            async with connect(node.url, additional_headers=cookie) as ws:
                workers.add(welcome_worker(await ws.recv()))
        assert len(workers) == 1, f"session {i} reached workers {workers}"
        seen[workers.pop()] += 1
    assert len(seen) == node.workers, seen


async def test_metrics_parse_and_move_with_traffic(node, feed) -> None:
    def deliveries() -> float:
        families = {f.name: f for f in text_string_to_metric_families(node.metrics())}
        assert families["oddsgate_fanout_latency_seconds"].type == "histogram"
        assert "oddsgate_connections" in families
        return sum(s.value for s in families["oddsgate_deliveries"].samples
                   if s.name == "oddsgate_deliveries_total")

    before = deliveries()
    players = await _players(node, 4)
    await asyncio.sleep(1.0)
    assert deliveries() > before
    await _close(players)


async def test_drain_sends_players_to_other_workers_with_no_gap(node, feed,
                                                                redis_server) -> None:
    players = await _players(node, 30)
    on_zero = [p for p in players if p.welcome["worker"] == 0]
    assert on_zero, "no player hashed to worker 0"
    reply = await asyncio.to_thread(node.command, cmd="drain", worker=0)
    assert reply["ok"] and reply["workers"][0]["agent"] == "up drain"
    await asyncio.to_thread(node.wait, lambda: node.haproxy_status()["w0"].startswith("DRAIN"),
                            5, "HAProxy's agent check sees the drain")
    for i in range(10):  # no new player lands on the draining worker
        cookie = {"Cookie": f"og_session={token(f'new{i}', f'n{i}')}"}
        async with connect(node.url, additional_headers=cookie) as ws:
            assert welcome_worker(await ws.recv()) != 0
    counts = [p.stats.events for p in on_zero]
    await asyncio.sleep(0.1)  # before the settle ends they are still served
    assert sum(p.stats.events for p in on_zero) > sum(counts)
    done = await asyncio.to_thread(node.command, cmd="drain", worker=0, wait=True, timeout=20)
    assert done["ok"] and done["workers"][0]["connections"] == 0
    for player in on_zero:
        await player.wait_resumed(1, timeout=15)
        assert player.welcome["worker"] != 0
    await _assert_consistent(players, redis_server.url, feed)
    assert all(p.stats.resets == 0 for p in players)
    undrained = await asyncio.to_thread(node.command, cmd="undrain", worker=0)
    assert undrained["workers"][0]["agent"] in ("up ready", "down")
    await asyncio.to_thread(node.wait_ready)
    await _close(players)


async def test_kill_9_of_a_worker_under_load_is_replaced_and_players_resume(
        node, feed, redis_server) -> None:
    players = await _players(node, 20)
    victim = node.status()["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(node.wait, lambda: node.worker_pids()[1] not in (None, victim),
                            20, "replacement")
    await asyncio.to_thread(node.wait_ready)
    await _assert_consistent(players, redis_server.url, feed)
    assert "signal 9" in node.log()
    await _close(players)


async def test_a_worker_whose_heartbeat_stops_is_killed_and_replaced(node) -> None:
    victim = node.status()["workers"][0]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        await asyncio.to_thread(node.wait, lambda: node.worker_pids()[0] not in (None, victim),
                                20, "replacement of the stalled worker")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    assert "heartbeat stopped" in node.log()
    await asyncio.to_thread(node.wait_ready)


async def test_reload_under_a_steady_feed_with_500_players(node, feed, redis_server) -> None:
    players = await _players(node, 500, topics_each=1)
    before = node.worker_pids()
    refused: list[str] = []
    stop = asyncio.Event()

    async def keep_connecting() -> int:
        made = 0
        while not stop.is_set():
            try:
                cookie = {"Cookie": f"og_session={token(f'probe{made}', f'pr{made}')}"}
                async with connect(node.url, additional_headers=cookie, open_timeout=5) as ws:
                    await ws.recv()
                made += 1
            except Exception as exc:  # any refusal counts
                refused.append(repr(exc))
            await asyncio.sleep(0.05)
        return made

    prober = asyncio.create_task(keep_connecting())
    result = await asyncio.to_thread(node.cli, "reload", "--timeout", "30", timeout=120)
    stop.set()
    probes = await prober
    assert result.returncode == 0, result.stderr + result.stdout
    after = node.worker_pids()
    assert all(a != b for a, b in zip(before, after, strict=True))
    assert refused == [] and probes > 10
    await _assert_consistent(players, redis_server.url, feed)
    assert sum(p.stats.reconnects for p in players) >= len(players) * 0.9
    await _close(players)


def test_metrics_show_only_live_workers_after_kills_and_a_reload(node) -> None:
    """The slots of processes that exited (kill -9, the stalled worker, the reload's
    predecessors) are cleared: one fresh heartbeat per worker, what the stale-heartbeat
    alert (deploy/prometheus/alerts.yml) relies on."""
    families = {f.name: f for f in text_string_to_metric_families(node.metrics())}
    ages = [s.value for s in families["oddsgate_worker_heartbeat_age_seconds"].samples]
    assert len(ages) == node.workers and max(ages) < 3, ages
    restarts = {s.labels["worker"]: s.value for s in
                families["oddsgate_worker_restarts"].samples}
    assert restarts == {"0": 1, "1": 1}  # the stalled one and the killed one; reloads don't count
    phases = {(s.labels["worker"], s.labels["phase"]) for s in
              families["oddsgate_worker_phase"].samples if s.value == 1}
    assert phases == {("0", "ready"), ("1", "ready")}


def test_cli_status_json_and_exit_codes(node, tmp_path) -> None:
    status = node.cli("status", "--json")
    assert status.returncode == 0 and '"workers"' in status.stdout
    bad = node.cli("drain", "--worker", "7")
    assert bad.returncode == 2 and "worker must be" in bad.stderr
    usage = node.cli("drain")
    assert usage.returncode == 2
    nobody = subprocess.run([sys.executable, "-m", "supervisor.cli", "status"], cwd=ROOT,
                            env={**os.environ, "OG_RUNTIME_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)
    assert nobody.returncode == 3 and "no supervisor" in nobody.stderr
    assert oct(os.stat(node.control).st_mode & 0o777) == "0o600"


async def test_automatic_drain_has_hysteresis(redis_server, tmp_path) -> None:
    auto = start_node(redis_server.url, tmp_path / "auto", OG_DRAIN_ABOVE_CONNECTIONS="6",
                      OG_DRAIN_RECOVER_SHARE="0.5")
    try:
        direct = f"ws://127.0.0.1:{auto.base_port}/ws"
        cookie = {"Cookie": f"og_session={token()}"}
        conns = [await connect(direct, additional_headers=cookie) for _ in range(7)]

        def agent0() -> str:
            return auto.status()["workers"][0]["agent"]

        await asyncio.to_thread(auto.wait, lambda: agent0() == "up drain", 10, "auto drain")
        for ws in conns[:3]:  # 4 left: under 6, not under 3: stays drained
            await ws.close()
        samples = []
        for _ in range(10):
            samples.append(agent0())
            await asyncio.sleep(0.1)
        assert set(samples) == {"up drain"}
        for ws in conns[3:6]:  # 1 left: under 3: ready again
            await ws.close()
        await asyncio.to_thread(auto.wait, lambda: agent0() == "up ready", 10, "recovery")
        await conns[6].close()
    finally:
        assert auto.stop() == 0


def test_a_crash_looping_node_gives_up_with_exit_1(redis_server, tmp_path) -> None:
    """Its only worker cannot bind its port: restarts back off, then the node gives up."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    env = {**os.environ, "OG_RUNTIME_DIR": str(tmp_path), "OG_REDIS_URL": redis_server.url,
           "OG_JWT_SECRET": "x", "OG_WORKERS": "1", "OG_BASE_PORT": str(port),
           "OG_CRASH_LOOP_RESTARTS": "2", "OG_RESTART_BACKOFF_S": "0.1",
           "OG_AGENT_PORT": str(_free()), "OG_METRICS_PORT": "0"}
    try:
        proc = subprocess.run([sys.executable, "-m", "supervisor.cli", "run"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
    finally:
        squatter.close()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "crash loop" in proc.stderr and "restarting in" in proc.stderr


def test_a_bad_partition_map_stops_the_node_at_start_with_exit_2(tmp_path) -> None:
    env = {**os.environ, "OG_RUNTIME_DIR": str(tmp_path), "OG_JWT_SECRET": "x",
           "OG_PARTITION_MAP": str(tmp_path / "missing.json")}
    proc = subprocess.run([sys.executable, "-m", "supervisor.cli", "run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "partition map" in proc.stderr


async def test_sigterm_tells_players_to_reconnect_then_exits_0(redis_server, tmp_path) -> None:
    small = start_node(redis_server.url, tmp_path / "term", OG_DRAIN_SETTLE_MS="0")
    ws = await connect(small.url, additional_headers={"Cookie": f"og_session={token()}"})
    await ws.recv()
    small.proc.send_signal(signal.SIGTERM)
    frames = []
    try:
        async for frame in ws:
            frames.append(frame)
    except Exception:
        pass
    assert any('"type":"reconnect"' in f for f in frames), frames
    assert ws.close_code == 1012
    assert small.proc.wait(30) == 0


def _free() -> int:
    from supervisor.embedded_redis import free_port

    return free_port()


async def test_region_drain_sends_every_player_to_another_region(redis_server,
                                                                 tmp_path) -> None:
    """`oddsgate drain --region` (a deploy rotating regions): every worker drains,
    every player's hint says `region_drain`, /healthz fails, and `--wait` returns 0
    once the node holds no player."""
    small = start_node(redis_server.url, tmp_path / "region", OG_DRAIN_SETTLE_MS="0",
                       OG_REGION="eu-west")
    players = []
    for i in range(6):
        ws = await connect(small.url,
                           additional_headers={"Cookie": f"og_session={token(f'r{i}', f'r{i}')}"})
        assert '"region":"eu-west"' in await ws.recv()
        players.append(ws)
    done = await asyncio.to_thread(small.cli, "drain", "--region", "--wait", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    for ws in players:
        frames = []
        with contextlib.suppress(Exception):
            async for frame in ws:
                frames.append(frame)
        hints = [f for f in frames if '"type":"reconnect"' in f]
        assert len(hints) == 1 and '"reason":"region_drain"' in hints[0], frames
        assert ws.close_code == 1012
    status = small.status()
    assert all(w["connections"] == 0 and w["phase"] == "draining" for w in status["workers"])
    healthz = small.url.replace("ws://", "http://").replace("/ws", "/healthz")
    status_code = (await asyncio.to_thread(http_get, healthz))[0]
    assert status_code == 503  # no worker takes players: a global balancer moves away
    assert small.stop() == 0


def test_a_node_whose_haproxy_cannot_start_leaves_no_service_running(redis_server,
                                                                     tmp_path) -> None:
    """Regression: the aggregator (started before HAProxy) outlived a node whose HAProxy
    failed to start, an orphan retrying Redis for hours."""
    import psutil

    from supervisor.embedded_redis import free_port_range as ports

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    runtime = tmp_path / "failing"
    base = ports(1)
    env = {**os.environ, "OG_RUNTIME_DIR": str(runtime), "OG_REDIS_URL": redis_server.url,
           "OG_JWT_SECRET": "x" * 32, "OG_WORKERS": "1", "OG_BASE_PORT": str(base),
           "OG_AGENT_PORT": str(ports(1)), "OG_METRICS_PORT": "0", "OG_AGGREGATE": "1",
           "OG_HAPROXY_BIND": f"127.0.0.1:{taken.getsockname()[1]}"}
    try:
        proc = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--haproxy"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    finally:
        taken.close()
    assert proc.returncode != 0
    left = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            if "aggregate" in (p.info["cmdline"] or []) and \
                    (p.info["environ"] or {}).get("OG_RUNTIME_DIR") == str(runtime):
                left.append(p.pid)
        except psutil.Error:
            continue
    assert left == [], f"aggregator processes left running: {left}"
