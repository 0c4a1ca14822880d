"""How long a drained worker's players are spread over (supervisor/node.py)."""

from __future__ import annotations

import pytest

from supervisor.node import Phase, Supervisor
from supervisor.settings import NodeSettings


@pytest.fixture
def supervisor(tmp_path):
    def make(**env: str) -> Supervisor:
        made = Supervisor(NodeSettings.from_env({"OG_WORKERS": "2", **env}), {}, tmp_path)
        made_list.append(made)
        return made

    made_list: list[Supervisor] = []
    yield make
    for made in made_list:
        made.table.close()
        made.table.unlink()


def test_a_small_crowd_gets_the_configured_window(supervisor) -> None:
    s = supervisor(OG_DRAIN_WINDOW_MS="500", OG_DRAIN_RECONNECTS_PER_WORKER_S="1000")
    assert s.drain_window_ms(0, receivers=1) == 500
    assert s.drain_window_ms(400, receivers=1) == 500


def test_a_big_crowd_returns_no_faster_than_the_rate(supervisor) -> None:
    s = supervisor(OG_DRAIN_WINDOW_MS="500", OG_DRAIN_RECONNECTS_PER_WORKER_S="1000")
    assert s.drain_window_ms(5000, receivers=1) == 5000
    assert s.drain_window_ms(5001, receivers=1) == 5001  # rounded up: never faster
    assert s.drain_window_ms(5000, receivers=4) == 1250  # four workers take them in


def test_receivers_are_the_workers_ready_now(supervisor) -> None:
    s = supervisor(OG_DRAIN_WINDOW_MS="0", OG_DRAIN_RECONNECTS_PER_WORKER_S="100")
    s.workers[0].phase = Phase.DRAINING  # the one being drained
    s.workers[1].phase = Phase.READY
    assert s.drain_window_ms(1000) == 10_000
    s.workers[1].phase = Phase.RESTARTING  # nobody ready: still spread as if one were
    assert s.drain_window_ms(1000) == 10_000


def test_rate_zero_keeps_the_window_whatever_the_crowd(supervisor) -> None:
    s = supervisor(OG_DRAIN_WINDOW_MS="800", OG_DRAIN_RECONNECTS_PER_WORKER_S="0")
    assert s.drain_window_ms(100_000, receivers=1) == 800
