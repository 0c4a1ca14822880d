"""Saturation's bisection: after the doubling ladder, the highest rate held to 10%."""

from __future__ import annotations

import pytest

from bench.scenarios.saturation import BISECT_WITHIN, next_probe


def _bisect(true_max: float, held: float, missed: float) -> tuple[float, float, int]:
    probes = 0
    while (probe := next_probe(held, missed)) is not None:
        probes += 1
        if probe <= true_max:
            held = probe
        else:
            missed = probe
    return held, missed, probes


@pytest.mark.parametrize("true_max", [16.1, 20.0, 23.5, 31.9])
def test_a_2x_gap_is_narrowed_to_10_percent_in_three_probes(true_max: float) -> None:
    held, missed, probes = _bisect(true_max, 16.0, 32.0)
    assert held <= true_max < missed
    assert missed <= held * BISECT_WITHIN and probes <= 3


def test_a_4x_gap_takes_four_and_the_middle_is_geometric() -> None:
    assert next_probe(8.0, 32.0) == 16.0
    held, missed, probes = _bisect(27.0, 8.0, 32.0)
    assert held <= 27.0 < missed and missed <= held * BISECT_WITHIN and probes <= 4


def test_nothing_to_bisect_within_10_percent() -> None:
    assert next_probe(10.0, 10.9) is None
