"""Issue 4's micro-batching A/B in the bench: the variant system and its report."""

from __future__ import annotations

from pathlib import Path

from bench.cli import UNBATCHED, _make, build_parser, plan_for
from bench.harness import Params, Result
from bench.peers.install import Availability
from bench.report import batching_lines


def _spike(system: str, deliveries: float, frames: float, per_cpu: float, p99: float) -> Result:
    return Result(system, "spike", "ok", figures={
        "deliveries_per_s": deliveries, "frames_per_s": frames, "delivered_share": 1.0,
        "deliveries_per_server_cpu_s": per_cpu, "latency_ms": {"p99_ms": p99}})


def test_the_report_sets_both_side_by_side() -> None:
    lines = batching_lines([_spike("oddsgate", 150_000, 50_000, 200_000, 100.0),
                            _spike(UNBATCHED, 90_000, 90_000, 80_000, 900.0)])
    rows = [line for line in lines if line.startswith("| oddsgate")]
    assert rows == ["| oddsgate | 150,000 | 100% | 200,000 | 3.00 | 100.0 |",
                    f"| {UNBATCHED} | 90,000 | 100% | 80,000 | 1.00 | 900.0 |"]
    assert "2.50x" in lines[-1] and "batching is kept" in lines[-1]


def test_the_report_says_when_one_frame_per_event_was_cheaper() -> None:
    lines = batching_lines([_spike("oddsgate", 1, 1, 40_000, 20.0),
                            _spike(UNBATCHED, 1, 1, 50_000, 20.0)])
    assert "one frame per event was cheaper" in lines[-1]


def test_no_ab_without_both_runs() -> None:
    assert batching_lines([_spike("oddsgate", 1, 1, 1, 1.0)]) == []


def test_the_variant_is_oddsgate_with_one_event_per_frame(tmp_path: Path) -> None:
    assert UNBATCHED in plan_for(build_parser().parse_args([]))["spike"]
    h = type("H", (), {"workdir": tmp_path, "avail": Availability(), "tree": tmp_path})()
    system = _make(UNBATCHED, h, Params.for_mode(True))
    assert system.name == UNBATCHED and system.env == {"OG_MAX_BATCH": "1"}
    assert "OG_MAX_BATCH=1" in system.description
