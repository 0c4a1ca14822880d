"""The node's breaker (gateway/breaker.py): a share of players, and enough of them."""

from __future__ import annotations

import pytest

from gateway.breaker import Breaker


def test_trips_at_the_share_with_enough_players_and_recovers_under_the_lower_mark() -> None:
    breaker = Breaker(0.05, 0.03, min_players=10)
    assert not breaker.update(9, 200)  # 4.5%
    assert breaker.update(10, 200) and breaker.open and breaker.trips == 1  # 5%
    assert not breaker.update(7, 200)  # 3.5%: between the marks, stays open
    assert breaker.update(10, 400) and not breaker.open  # 2.5%


@pytest.mark.parametrize("players", [1, 2, 3, 9])
def test_one_connection_never_trips_it_however_few_players(players: int) -> None:
    """Regression: one player flooding pings and never reading was a third of a
    three-player node in back-pressure and shed every new subscriber."""
    breaker = Breaker(0.05, 0.03, min_players=10)
    assert not breaker.update(1, players)
    assert not breaker.open


def test_closes_when_too_few_players_are_left_behind() -> None:
    breaker = Breaker(0.05, 0.03, min_players=10)  # recovers under 6 players
    assert breaker.update(10, 20)
    assert not breaker.update(6, 20)
    assert breaker.update(5, 20) and not breaker.open  # 25%, but only five players


def test_no_players_no_share() -> None:
    breaker = Breaker(0.05, 0.03, min_players=1)
    assert not breaker.update(0, 0) and breaker.share == 0.0
