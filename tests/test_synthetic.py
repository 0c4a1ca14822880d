"""The synthetic feed against a real redis-server: determinism, pacing, seqs, spike, bounds, CLI."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from feed.events import PriceUpdate
from feed.publisher import Publisher
from feed.synthetic import MarketModel, Spike, SyntheticFeed, main
from gateway.topics import PartitionMap, parse_topic
from redis_contract import history_key, meta_key
from supervisor.embedded_redis import EmbeddedRedis, free_port

REPO = Path(__file__).resolve().parent.parent
PMAP = PartitionMap.load(None)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server"),
    reason="redis-server is not installed (scripts/bootstrap.sh installs it)",
)


@pytest.fixture(scope="module")
def feed_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=0) as server:
        yield server


@pytest.fixture
async def client(feed_redis: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    conn = aioredis.Redis.from_url(feed_redis.url)
    await conn.flushall()
    yield conn
    await conn.aclose()


@pytest.fixture
def sync_client(feed_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(feed_redis.url)
    conn.flushall()
    yield conn
    conn.close()


async def topic_seqs(conn: aioredis.Redis) -> dict[str, int]:
    """Every topic that got an event, with its last seq (= events published on it)."""
    seqs: dict[str, int] = {}
    async for key in conn.scan_iter(match="og:{*}:meta", count=1000):
        topic = key.decode()[len("og:{") : -len("}:meta")]
        seqs[topic] = int(await conn.hget(meta_key(topic), "seq"))
    return seqs


async def history(conn: aioredis.Redis, topic: str) -> list[tuple[int, dict]]:
    entries = await conn.xrange(history_key(topic))
    return [(int(fields[b"s"]), orjson.loads(fields[b"e"])) for _id, fields in entries]


def comparable(update: PriceUpdate | dict) -> tuple:
    """An event without what the publisher adds (seq, epoch, ts)."""
    if isinstance(update, PriceUpdate):
        return (update.topic, update.market, update.event_id, update.status, update.prices)
    return (
        update["topic"],
        update["market"],
        update["event_id"],
        update["status"],
        update["prices"],
    )


# -- the universe and the stream (no Redis) ------------------------------------


def test_universe_is_deterministic_and_shaped_by_the_map() -> None:
    feed = SyntheticFeed(None, PMAP, seed=42, markets_per_league=5, tail_leagues=3)
    again = SyntheticFeed(None, PMAP, seed=42, markets_per_league=5, tail_leagues=3)
    other = SyntheticFeed(None, PMAP, seed=43, markets_per_league=5, tail_leagues=3)
    assert feed.universe() == again.universe()
    assert feed.topics_by_popularity() == again.topics_by_popularity()
    assert [m.rank for m in feed.universe()] != [m.rank for m in other.universe()]

    markets = feed.universe()
    leagues_per_sport = {
        sport: len([lg for s, lg in PMAP.market_level if s == sport]) + 3 for sport in PMAP.sports
    }
    assert len(markets) == 5 * sum(leagues_per_sport.values())
    assert sorted(m.rank for m in markets) == list(range(len(markets)))
    assert abs(sum(m.share for m in markets) - 1.0) < 1e-9
    for m in markets:
        topic = PMAP.validate(m.topic)
        assert topic is not None, m.topic
        assert m.market_level == PMAP.is_market_level(m.sport, m.league)
        assert (topic.market is not None) == m.market_level
        assert m.outcomes == (
            ("home", "draw", "away") if PMAP.sports[m.sport] == "football" else ("home", "away")
        )
        assert m.event_id.startswith("m-")
    tail = {(m.sport, m.league) for m in markets if not m.market_level}
    assert len(tail) == 3 * len(PMAP.sports)
    assert not tail & PMAP.market_level
    # the high-value topics of the default map exist in the universe
    assert PMAP.high_value <= set(feed.topics())

    shares = feed.topic_shares()
    ordered = feed.topics_by_popularity()
    assert sorted(ordered) == feed.topics()
    assert all(shares[a] >= shares[b] for a, b in itertools.pairwise(ordered))
    top_market_level = min((m for m in markets if m.market_level), key=lambda m: m.rank)
    assert feed.spike_market == top_market_level
    # Zipf: the most popular market outweighs the median one many times
    by_rank = sorted(markets, key=lambda m: m.rank)
    assert by_rank[0].share > 20 * by_rank[len(by_rank) // 2].share


def test_first_updates_are_deterministic_and_valid() -> None:
    first = SyntheticFeed(None, PMAP, seed=7).take(2000)
    second = SyntheticFeed(None, PMAP, seed=7).take(2000)
    assert [comparable(u) for u in first] == [comparable(u) for u in second]
    assert [comparable(u) for u in first] != [
        comparable(u) for u in SyntheticFeed(None, PMAP, seed=8).take(2000)
    ]
    for update in first:
        update.validate(PMAP)
        for price in update.prices.values():
            whole, _, cents = price.partition(".")
            assert whole.isdigit() and len(cents) == 2 and cents.isdigit()
            assert float(price) >= 1.01
    statuses = {u.status for u in first}
    assert {"open", "suspended"} <= statuses


def test_suspended_reopens_and_closed_stops() -> None:
    feed = SyntheticFeed(
        None,
        PMAP,
        seed=3,
        markets_per_league=2,
        tail_leagues=1,
        close_probability=0.02,
        suspend_probability=0.1,
    )
    last_status: dict[str, str] = {}
    for update in feed.take(5000):
        previous = last_status.get(update.market)
        assert previous != "closed", f"{update.market} published after it closed"
        if previous == "suspended":
            assert update.status == "open"
        last_status[update.market] = update.status
    assert "closed" in last_status.values()
    assert feed.open_markets == sum(1 for s in last_status.values() if s != "closed") + (
        len(feed.universe()) - len(last_status)
    )


def test_the_model_alone_is_the_feeds_stream() -> None:
    """Pacing decides when updates are taken, never which: the bare model yields the same."""
    model = MarketModel(PMAP, seed=7)
    assert model.take(500) == SyntheticFeed(None, PMAP, seed=7, rate=5).take(500)
    spiked = model.take_spike(50)
    assert {u.market for u in spiked} == {model.spike_market.market_key}
    assert "closed" not in {u.status for u in spiked}


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        SyntheticFeed(None, PMAP, rate=0)
    with pytest.raises(ValueError):
        SyntheticFeed(None, PMAP, markets_per_league=0)


# -- publishing into Redis -----------------------------------------------------


async def test_published_stream_matches_the_seeded_stream(client: aioredis.Redis) -> None:
    feed = SyntheticFeed(Publisher(client, PMAP), PMAP, seed=11, rate=20_000)
    result = await feed.run(count=400)
    assert result.published == 400
    expected = SyntheticFeed(None, PMAP, seed=11).take(400)
    by_topic: dict[str, list[tuple]] = {}
    for update in expected:
        by_topic.setdefault(update.topic, []).append(comparable(update))
    seqs = await topic_seqs(client)
    assert set(seqs) == set(by_topic)
    for topic, events in by_topic.items():
        assert [comparable(e) for _s, e in await history(client, topic)] == events


async def test_rate_is_roughly_the_requested_one(client: aioredis.Redis) -> None:
    rate = 2000
    feed = SyntheticFeed(Publisher(client, PMAP), PMAP, seed=5, rate=rate)
    result = await feed.run(duration=1.0)
    assert result.seconds >= 1.0  # the duration is the feed's own clock, not a wall bound
    assert 0.5 * rate * result.seconds <= result.published <= 1.5 * rate * result.seconds
    assert sum((await topic_seqs(client)).values()) == result.published
    assert result.errors == 0


async def test_seqs_are_contiguous_in_history(client: aioredis.Redis) -> None:
    feed = SyntheticFeed(Publisher(client, PMAP), PMAP, seed=9, rate=5000)
    result = await feed.run(duration=0.6)
    seqs = await topic_seqs(client)
    assert sum(seqs.values()) == result.published > 0
    for topic, last_seq in seqs.items():
        entries = await history(client, topic)
        assert [s for s, _e in entries] == list(range(1, last_seq + 1)), topic
        epochs = {e["epoch"] for _s, e in entries}
        assert len(epochs) == 1
        for s, event in entries:
            assert event["seq"] == s and event["topic"] == topic and event["type"] == "odds"
            assert parse_topic(topic) is not None
            assert event["ts"] > 0


async def test_spike_multiplies_the_spiked_markets_share(client: aioredis.Redis) -> None:
    rate, seconds = 300, 0.6
    plain = SyntheticFeed(Publisher(client, PMAP), PMAP, seed=21, rate=rate)
    spiked_topic = plain.spike_market.topic
    base = await plain.run(duration=seconds)
    base_count = (await topic_seqs(client)).get(spiked_topic, 0)
    base_share = base_count / base.published

    await client.flushall()
    spiking = SyntheticFeed(
        Publisher(client, PMAP), PMAP, seed=21, rate=rate, spike=Spike(after=0.0, seconds=60)
    )
    assert spiking.spike_market.topic == spiked_topic
    result = await spiking.run(duration=seconds)
    spike_count = (await topic_seqs(client)).get(spiked_topic, 0)
    assert result.spike_published > 0
    # x50 on one market: its event count grows by an order of magnitude, and so does
    # its share of all events (from ~p to ~50p / (1 + 49p))
    assert spike_count >= 15 * max(base_count, 1)
    assert spike_count / result.published > min(3 * base_share, 0.6)
    # the rest of the feed keeps its own rate
    assert 0.5 * base.published <= result.published - result.spike_published <= 1.5 * base.published


async def test_bounded_runs_stop_by_themselves(client: aioredis.Redis) -> None:
    feed = SyntheticFeed(Publisher(client, PMAP), PMAP, seed=1, rate=1000)
    result = await asyncio.wait_for(feed.run(count=137), timeout=5)
    assert result.published == 137
    assert sum((await topic_seqs(client)).values()) == 137

    started = time.monotonic()
    result = await asyncio.wait_for(feed.run(duration=0.3), timeout=5)
    assert 0.25 <= time.monotonic() - started < 2.0
    assert result.published > 0

    asyncio.get_running_loop().call_later(0.2, feed.stop)
    started = time.monotonic()
    await asyncio.wait_for(feed.run(), timeout=5)
    assert time.monotonic() - started < 1.5


async def test_reports_each_second(client: aioredis.Redis) -> None:
    reports = []
    feed = SyntheticFeed(Publisher(client, PMAP), PMAP, seed=1, rate=500, on_report=reports.append)
    await feed.run(duration=1.2)
    assert reports, "no report"
    first = reports[0]
    assert first.published_interval > 0 and first.rate > 0
    assert first.rtt_p50_ms is not None and first.rtt_max_ms is not None
    assert "rate=" in first.line()


async def test_feed_rides_out_a_redis_restart(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, port=0, persist=True) as server:
        conn = aioredis.Redis.from_url(server.url)
        feed = SyntheticFeed(Publisher(conn, PMAP), PMAP, seed=2, rate=1000)
        run = asyncio.create_task(feed.run(duration=1.2))
        await asyncio.sleep(0.4)
        await asyncio.to_thread(server.restart)
        result = await run
        assert result.published > 300, result
        for topic, last_seq in (await topic_seqs(conn)).items():
            entries = await history(conn, topic)
            assert [s for s, _e in entries] == list(range(1, last_seq + 1)), topic
        await conn.aclose()


# -- the CLI -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--rate", "0"],
        ["--rate", "fast"],
        ["--count", "-3"],
        ["--duration", "nan"],
        ["--history-seconds", "5"],
        ["--partition-map", "/nonexistent/map.json"],
        ["--redis-url", "http://example.invalid"],
        ["--no-such-flag"],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "oddsgate feed: error" in capsys.readouterr().err


def test_cli_unreachable_redis_exits_1_with_one_line() -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "feed.synthetic", "--redis-url", f"redis://127.0.0.1:{port}/0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot reach Redis" in lines[0] and "Traceback" not in proc.stderr


def test_cli_publishes_a_bounded_run(feed_redis: EmbeddedRedis, sync_client: redis.Redis) -> None:
    argv = ["--redis-url", feed_redis.url, "--count", "50", "--rate", "2000", "--quiet"]
    assert main(argv) == 0
    total = sum(int(sync_client.hget(key, "seq")) for key in sync_client.scan_iter("og:{*}:meta"))
    assert total == 50


def test_cli_stops_cleanly_on_sigterm(feed_redis: EmbeddedRedis, sync_client: redis.Redis) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "feed.synthetic",
            "--redis-url",
            feed_redis.url,
            "--rate",
            "200",
            "--duration",
            "30",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "markets on" in proc.stderr.readline()  # the start line: running now
        time.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 2.0
        assert "done" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_opening_prices_list_every_market_without_advancing_the_stream(pmap) -> None:
    feed = SyntheticFeed(None, pmap, seed=11)
    opening = feed.opening_prices()
    assert len(opening) == len(feed.universe())
    assert {u.market for u in opening} == {m.market_key for m in feed.universe()}
    for update in opening:
        update.validate(pmap)
    assert feed.take(50) == SyntheticFeed(None, pmap, seed=11).take(50)


async def test_the_bench_opens_every_market_before_players_follow(redis_url) -> None:
    from bench.feedproc import bench_feed, open_markets

    count = await open_markets(redis_url, seed=3)
    topics = bench_feed(3).topics()
    assert count == len(bench_feed(3).universe())
    client = aioredis.Redis.from_url(redis_url)
    try:
        for topic in topics:
            assert int(await client.hget(meta_key(topic), "seq")) >= 1
    finally:
        await client.aclose()
