"""Synthetic providers (aggregator/providers.py): seeded, window-invariant, and badly behaved."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from dataclasses import replace
from decimal import Decimal

import pytest

from aggregator.inputs import ProviderMessage, encode, parse
from aggregator.providers import (
    Episode,
    MarketSpec,
    ProviderConfig,
    ProviderSet,
    TruthConfig,
    default_markets,
    default_providers,
)

MS = 1_000_000
S = 1_000 * MS
START = 1_763_800_000_000_000_000  # a real Unix time in ns: nothing assumes a zero origin
RUN = 600 * S  # ten minutes of data time

# Default providers; a truth whose markets close inside the run.
TRUTH = TruthConfig(close_after_ms=(120_000, 1_500_000))


@pytest.fixture(scope="module")
def long_run() -> tuple[ProviderSet, list[ProviderMessage]]:
    providers = ProviderSet(2026, truth=TRUTH, start_ns=START)
    return providers, providers.messages_between(START, START + RUN)


def by_provider(msgs: list[ProviderMessage]) -> dict[str, list[ProviderMessage]]:
    streams: dict[str, list[ProviderMessage]] = defaultdict(list)
    for msg in msgs:
        streams[msg.provider].append(msg)
    return streams


def config_of(providers: ProviderSet, name: str) -> ProviderConfig:
    return next(c for c in providers.providers if c.name == name)


def lag_bounds(config: ProviderConfig, tick_ms: int) -> tuple[int, int]:
    """A message sent at truth time T has pts in [T + low, T + high]."""
    return config.delay_ms * MS, (config.delay_ms + config.jitter_ms + tick_ms) * MS


# -- determinism -----------------------------------------------------------------------


def test_one_seed_gives_the_same_bytes_and_another_seed_does_not() -> None:
    window = (START, START + 20 * S)
    one = [encode(m) for m in ProviderSet(5, start_ns=START).messages_between(*window)]
    two = [encode(m) for m in ProviderSet(5, start_ns=START).messages_between(*window)]
    other = [encode(m) for m in ProviderSet(6, start_ns=START).messages_between(*window)]
    assert one == two
    assert one != other
    assert ProviderSet("5", start_ns=START).messages_between(*window) != []


def test_a_provider_does_not_depend_on_the_others() -> None:
    """Each provider draws from its own generators: adding a provider changes nobody else."""
    window = (0, 30 * S)
    three = ProviderSet(9, providers=default_providers()[:3])
    four = ProviderSet(9, providers=default_providers())
    for name in three.names:
        assert three.messages_between(*window, provider=name) == four.messages_between(
            *window, provider=name
        )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_splitting_the_window_anywhere_changes_nothing(seed: int) -> None:
    end = START + 60 * S
    whole = ProviderSet(seed, start_ns=START).messages_between(START, end)
    rnd = random.Random(seed)
    cuts = sorted(rnd.randrange(START, end) for _ in range(5))
    edges = [START, *cuts, end]
    pieces = ProviderSet(seed, start_ns=START)
    parts = [pieces.messages_between(a, b) for a, b in itertools.pairwise(edges)]
    for name in pieces.names:
        joined = [m for part in parts for m in part if m.provider == name]
        assert joined == [m for m in whole if m.provider == name]


def test_a_live_process_asking_every_100_ms_sends_what_a_test_generates_offline() -> None:
    offline = ProviderSet(4, start_ns=START).messages_between(START, START + 20 * S)
    live = ProviderSet(4, start_ns=START)
    sent: list[ProviderMessage] = []
    for t in range(START, START + 20 * S, 100 * MS):
        sent += live.messages_between(t, t + 100 * MS)
    assert sorted(sent, key=lambda m: (m.provider, m.pseq)) == offline


def test_going_back_replays_from_the_start_and_overlapping_windows_agree() -> None:
    providers = ProviderSet(8, start_ns=START)
    late = providers.messages_between(START + 30 * S, START + 40 * S)
    early = providers.messages_between(START + 5 * S, START + 35 * S)
    assert [m for m in early if m.pts >= START + 30 * S] == [
        m for m in late if m.pts < START + 35 * S
    ]
    assert providers.messages_between(START + 30 * S, START + 40 * S) == late
    assert providers.messages_between(0, START) == []  # nothing before the start


def test_one_provider_s_messages_are_its_share_of_all() -> None:
    providers = ProviderSet(3)
    every = providers.messages_between(0, 10 * S)
    for name in providers.names:
        assert providers.messages_between(0, 10 * S, provider=name) == [
            m for m in every if m.provider == name
        ]
    assert providers.streams_between(0, 10 * S) == dict(by_provider(every))


# -- the stream contract ------------------------------------------------------------------


def test_every_message_is_valid_input_and_values_are_decimal_strings(long_run) -> None:
    _, msgs = long_run
    for msg in msgs:
        assert parse(encode(msg)) == msg
        for _, value in msg.values:
            assert Decimal(value) > 0 and "e" not in value.lower()
            places = len(value.split(".")[1])
            assert places == (2 if msg.kind == "prices" else 4)


def test_pseq_is_contiguous_from_1_and_pts_never_goes_down(long_run) -> None:
    providers, msgs = long_run
    streams = by_provider(msgs)
    assert sorted(streams) == list(providers.names)
    for stream in streams.values():
        assert [m.pseq for m in stream] == list(range(1, len(stream) + 1))
        assert all(a.pts <= b.pts for a, b in itertools.pairwise(stream))


def test_heartbeats_every_heartbeat_ms_while_alive_and_nothing_during_an_outage(long_run) -> None:
    providers, msgs = long_run
    tick = providers.truth.tick_ms
    outages = [e for e in providers.episodes(START + RUN) if e.kind == "outage"]
    for name, stream in by_provider(msgs).items():
        config = config_of(providers, name)
        low, high = lag_bounds(config, tick)
        mine = [e for e in outages if e.provider == name]
        slack = high + (config.heartbeat_ms + tick) * MS

        def around(e: Episode, a: int, b: int, slack: int = slack) -> bool:
            """The gap (a, b) is this outage: it starts and ends where the outage does."""
            return abs(a - e.start_ns) <= slack and abs(b - e.end_ns) <= slack
        # the clock runs on while it is silent: its first heartbeat back may be a tick early
        silent = [(e.start_ns + high, e.end_ns + low - tick * MS) for e in mine]
        for msg in stream:
            assert not any(a < msg.pts < b for a, b in silent), (name, msg)
        beats = [m.pts for m in stream if m.is_heartbeat]
        assert beats[0] == START
        for a, b in itertools.pairwise(beats):
            if b - a != config.heartbeat_ms * MS:  # only an outage skips heartbeats
                assert any(around(e, a, b) for e in mine), (name, a, b)
        # and no stretch without any message longer than a heartbeat, outages aside
        all_pts = [m.pts for m in stream]
        for a, b in itertools.pairwise(all_pts):
            if b - a > config.heartbeat_ms * MS:
                assert any(around(e, a, b) for e in mine), (name, a, b)


def test_kinds_alternate_between_providers_and_each_sport_has_three(long_run) -> None:
    providers, msgs = long_run
    kinds = {m.provider: m.kind for m in msgs if not m.is_heartbeat}
    assert set(kinds.values()) == {"prices", "probabilities"}
    for name, kind in kinds.items():
        assert kind == config_of(providers, name).kind
        assert all(m.kind in (kind, "heartbeat") for m in msgs if m.provider == name)
    quoting: dict[int, set[str]] = defaultdict(set)
    for msg in msgs:
        if not msg.is_heartbeat:
            quoting[int(msg.market.split(":")[0])].add(msg.provider)
    assert quoting.keys() == {1, 2, 4}
    assert all(len(names) >= 3 for names in quoting.values())


def test_prices_carry_the_provider_s_margin_and_probabilities_sum_to_one(long_run) -> None:
    providers, msgs = long_run
    outliers = {(e.provider, e.pseq) for e in providers.episodes() if e.kind == "outlier"}
    for msg in msgs:
        if msg.is_heartbeat or msg.status != "open" or (msg.provider, msg.pseq) in outliers:
            continue
        if msg.kind == "prices":
            margin = Decimal(config_of(providers, msg.provider).margin)
            book = sum(1 / Decimal(v) for _, v in msg.values)
            assert abs(book - 1 - margin) < Decimal("0.02"), msg
        else:
            assert abs(sum(Decimal(v) for _, v in msg.values) - 1) <= Decimal("0.0003"), msg


def test_delay_pts_lags_the_truth_by_each_provider_s_own_delay(long_run) -> None:
    """A market-wide suspension reaches each provider at truth time + its delay (+ jitter)."""
    providers, msgs = long_run
    tick = providers.truth.tick_ms
    episodes = providers.episodes(START + RUN)
    lags: dict[str, list[int]] = defaultdict(list)
    for episode in episodes:
        if episode.kind != "suspension":
            continue
        busy = {e.provider for e in episodes  # it was silent on that market, or suspended it
                if e.kind in ("outage", "stale", "lone_suspension")
                and e.market in ("", episode.market)
                and e.start_ns - S < episode.start_ns < e.end_ns + S}
        first: dict[str, int] = {}
        for msg in msgs:
            if (msg.market == episode.market and msg.status == "suspended"
                    and msg.provider not in busy and msg.provider not in first
                    and episode.start_ns <= msg.pts <= episode.end_ns):
                first[msg.provider] = msg.pts - episode.start_ns
        for name, lag in first.items():
            lags[name].append(lag)
    assert len(lags) >= 3
    for name, seen in lags.items():
        low, high = lag_bounds(config_of(providers, name), tick)
        assert all(low <= lag <= high for lag in seen), (name, seen)


# -- behaviours ------------------------------------------------------------------------------


def episodes_of(providers: ProviderSet, kind: str) -> list[Episode]:
    return [e for e in providers.episodes(START + RUN - 30 * S) if e.kind == kind]


def test_every_behaviour_occurs_in_ten_minutes(long_run) -> None:
    providers, _ = long_run
    kinds = defaultdict(set)
    for episode in providers.episodes(START + RUN):
        kinds[episode.kind].add(episode.provider)
    assert set(kinds) == {"outage", "stale", "outlier", "lone_suspension", "suspension",
                          "closure"}
    assert len(kinds["outage"]) >= 2 and len(kinds["outlier"]) >= 3


def test_an_outage_silences_the_provider_and_it_comes_back_with_every_market(long_run) -> None:
    providers, msgs = long_run
    streams = by_provider(msgs)
    tick = providers.truth.tick_ms
    checked = 0
    for episode in episodes_of(providers, "outage"):
        config = config_of(providers, episode.provider)
        low, high = lag_bounds(config, tick)
        stream = streams[episode.provider]
        before = [m for m in stream if m.pts <= episode.start_ns + high]
        after = [m for m in stream if m.pts >= episode.end_ns + low]
        assert after[0].pts - before[-1].pts >= episode.end_ns - episode.start_ns - high
        # back with the state of every market it quotes (but stale or closed ones)
        quotes = [m for m in after if not m.is_heartbeat]
        first = [m for m in quotes if m.pts == quotes[0].pts]
        assert len({m.market for m in first}) >= 2
        checked += 1
    assert checked >= 2


def test_a_stale_stretch_keeps_heartbeats_but_stops_that_market(long_run) -> None:
    providers, msgs = long_run
    streams = by_provider(msgs)
    tick = providers.truth.tick_ms
    outages = episodes_of(providers, "outage")
    checked = 0
    for episode in episodes_of(providers, "stale"):
        config = config_of(providers, episode.provider)
        low, high = lag_bounds(config, tick)
        inside = [m for m in streams[episode.provider]
                  if episode.start_ns + high < m.pts < episode.end_ns + low]
        assert not any(m.market == episode.market for m in inside)
        if any(o.provider == episode.provider and o.start_ns < episode.end_ns
               and o.end_ns > episode.start_ns for o in outages):
            continue
        beats = [m for m in inside if m.is_heartbeat]
        span = episode.end_ns - episode.start_ns - high
        assert len(beats) >= span // (config.heartbeat_ms * MS) - 1
        others = [m for m in msgs if m.provider != episode.provider
                  and m.market == episode.market and episode.start_ns < m.pts < episode.end_ns]
        assert others or episode.end_ns - episode.start_ns < 3 * S  # the market lives on
        checked += 1
    assert checked >= 2


def implied(msg: ProviderMessage) -> dict[str, Decimal]:
    if msg.kind == "prices":
        raw = {o: 1 / Decimal(v) for o, v in msg.values}
    else:
        raw = {o: Decimal(v) for o, v in msg.values}
    total = sum(raw.values())
    return {o: p / total for o, p in raw.items()}


def jump(a: ProviderMessage, b: ProviderMessage) -> Decimal:
    pa, pb = implied(a), implied(b)
    return max(max(pa[o] / pb[o], pb[o] / pa[o]) for o in pa)


def test_an_outlier_is_one_wild_quote_among_ordinary_ones(long_run) -> None:
    providers, msgs = long_run
    outliers = {(e.provider, e.pseq) for e in providers.episodes() if e.kind == "outlier"}
    previous: dict[tuple[str, str], ProviderMessage] = {}
    wild = ordinary = ordinary_wild = 0
    for msg in msgs:
        if msg.is_heartbeat or msg.status != "open":
            continue
        key = (msg.provider, msg.market)
        last = previous.get(key)
        previous[key] = msg
        if last is None or (last.provider, last.pseq) in outliers:
            continue
        if (msg.provider, msg.pseq) in outliers:
            assert jump(last, msg) >= Decimal("1.5"), msg
            wild += 1
        else:
            ordinary += 1
            ordinary_wild += jump(last, msg) >= Decimal("1.5")
    assert wild >= 3
    assert ordinary_wild <= ordinary // 200  # reopening after news moves prices; rarely so far


def test_a_lone_suspension_is_one_provider_while_the_others_quote(long_run) -> None:
    providers, msgs = long_run
    tick = providers.truth.tick_ms
    checked = 0
    for episode in episodes_of(providers, "lone_suspension"):
        low, high = lag_bounds(config_of(providers, episode.provider), tick)
        mine = [m for m in msgs if m.provider == episode.provider and m.market == episode.market
                and episode.start_ns + low <= m.pts < episode.end_ns + low]
        suspended = [m for m in mine if m.status == "suspended"]
        assert suspended and suspended[0].pts <= episode.start_ns + high
        assert suspended[0].values == ()
        assert all(m.status == "suspended" for m in mine if m.pts > suspended[0].pts)
        others_open = [m for m in msgs if m.provider != episode.provider
                       and m.market == episode.market and m.status == "open"
                       and suspended[0].pts < m.pts < episode.end_ns]
        checked += bool(others_open)
    assert checked >= 3


def test_a_market_wide_suspension_reaches_every_provider(long_run) -> None:
    providers, msgs = long_run
    everyone = 0
    for episode in episodes_of(providers, "suspension"):
        covering = {m.provider for m in msgs if m.market == episode.market}
        suspended = {m.provider for m in msgs if m.market == episode.market
                     and m.status == "suspended"
                     and episode.start_ns <= m.pts <= episode.end_ns + S}
        assert len(suspended) >= 2 or len(covering) < 3
        everyone += suspended == covering
        reopened = [m for m in msgs if m.market == episode.market and m.status == "open"
                    and episode.end_ns <= m.pts <= episode.end_ns + 2 * S]
        assert reopened or any(e.kind == "closure" and e.market == episode.market
                               for e in providers.episodes())
    assert everyone >= 5


def test_a_closed_market_is_closed_by_every_provider_and_never_quoted_again(long_run) -> None:
    providers, msgs = long_run
    closures = episodes_of(providers, "closure")
    assert len(closures) >= 2
    for episode in closures:
        quoting = {m.provider for m in msgs if m.market == episode.market}
        closed: dict[str, int] = {}
        for msg in msgs:
            if msg.market != episode.market:
                continue
            assert msg.provider not in closed, f"{msg.provider} quoted {msg.market} after closing"
            if msg.status == "closed":
                assert msg.pts >= episode.start_ns and msg.values == ()
                closed[msg.provider] = msg.pts
        assert set(closed) == quoting


# -- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"markets": []}, "at least one market"),
        ({"providers": []}, "at least one provider"),
        ({"markets": [MarketSpec("1:2:3", "m", "1x2")] * 2}, "markets must be unique"),
        ({"markets": [MarketSpec("1:2:3", "m", "moneyline")]}, "type 'moneyline' is not"),
        ({"markets": [MarketSpec("1:02:3", "m", "1x2")]}, "market: '1:02:3' is not"),
        ({"markets": [MarketSpec("1:2:3", "", "1x2")]}, "event_id"),
        ({"providers": [ProviderConfig("Atlas")]}, "provider 'Atlas'"),
        ({"providers": [ProviderConfig("a"), ProviderConfig("a")]}, "names must be unique"),
        ({"providers": [ProviderConfig("a", kind="heartbeat")]}, "kind 'heartbeat'"),
        ({"providers": [ProviderConfig("a", heartbeat_ms=0)]}, "heartbeat_ms"),
        ({"providers": [ProviderConfig("a", decimals=7)]}, "decimals must be 1 to 6"),
        ({"providers": [ProviderConfig("a", margin="five")]}, "margin 'five'"),
        ({"providers": [ProviderConfig("a", margin="-0.01")]}, "margin '-0.01'"),
        ({"truth": TruthConfig(tick_ms=0)}, "tick_ms"),
    ],
)
def test_a_bad_configuration_is_refused(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ProviderSet(1, **kwargs)


def test_bad_windows_and_names_are_refused() -> None:
    providers = ProviderSet(1, markets=default_markets()[:1],
                            providers=[replace(c, sports=None) for c in default_providers()])
    with pytest.raises(ValueError, match="ends before it starts"):
        providers.messages_between(10, 5)
    with pytest.raises(ValueError, match="unknown provider"):
        providers.messages_between(0, 5, provider="nobody")
