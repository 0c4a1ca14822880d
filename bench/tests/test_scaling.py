"""`python -m bench scaling`'s pure pieces: the plan, the rows, the table, the plot's series."""

from __future__ import annotations

from bench.harness import Result
from bench.scaling import (
    annotate,
    combine,
    every_run,
    fill_row,
    one_line,
    plan_rows,
    plot_series,
    table_md,
)

MACHINE = {"date": "2026-11-27 22:00 UTC", "cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5,
           "kernel": "6.18", "python": "3.11.7", "git": {"commit": "abc1234", "dirty": False},
           "background_cores": 0.1}
PARAMS = {"connections": 1000, "topics_per_conn": 5, "steps": [8, 64], "base_rate": 13.3,
          "p99_limit_ms": 50.0, "loadgens": 2, "check_share": 0.1}


def _step(multiplier: float, p99: float, share: float = 1.0, limit: str = "not CPU") -> dict:
    return {"multiplier": multiplier, "latency_ms": {"p99_ms": p99}, "delivered_share": share,
            "limited_by": limit}


def _result(held: float, deliveries: float, *, every_step: bool = False) -> Result:
    steps = [_step(8, 10), _step(64, 30 if every_step else 90, limit="machine CPU (all cores "
                                                                      "busy)")]
    notes = ["every step held (up to x64)"] if every_step else [
        "x64 did not hold: p99 90 ms; the highest held, x8, is within 7% of it"]
    return Result("oddsgate", "saturation", "ok", notes=notes, figures={
        "held_rate": held, "deliveries_per_s": deliveries,
        "deliveries_per_server_cpu_s": 200_000, "server_cores": 0.5,
        "latency_ms": {"p50_ms": 2.0, "p99_ms": 10.0}, "loadgen_cores": 0.6,
        "frames_per_s": deliveries / 4,
        "machine_cores_busy": 1.5, "checked_connections": 100, "open_connections": 1000,
        "violations_total": 0, "steps": steps})


def test_counts_above_the_cores_are_skipped_with_a_clear_row():
    rows = plan_rows(2)
    assert [(r["kind"], r["workers"], r["status"]) for r in rows] == [
        ("workers", 1, "planned"), ("workers", 2, "planned"), ("workers", 4, "skipped"),
        ("workers", 8, "skipped"), ("nodes", 1, "planned"), ("nodes", 2, "planned")]
    assert rows[2]["reason"] == "skipped: 2 cores"
    assert plan_rows(16)[3]["status"] == "planned"
    assert plan_rows(2, [1], [2], workers_per_node=2)[1]["status"] == "skipped"


def test_rows_carry_what_saturation_measured_and_efficiency_against_one_worker():
    rows = plan_rows(2, [1, 2, 4], [])
    rows[0] = fill_row(rows[0], _result(800, 160_000, every_step=True))
    rows[1] = fill_row(rows[1], _result(1400, 280_000))
    annotate(rows)
    one, two, four = rows
    assert one["lower_bound"] and not two["lower_bound"]
    assert one["limited_by"] == "machine CPU (all cores busy)"  # the top step when none missed
    assert two["limited_by"] == "machine CPU (all cores busy)"  # the first step missed
    assert two["deliveries_per_s_per_worker"] == 140_000
    assert two["events_per_frame"] == 4
    assert (one["speedup"], one["efficiency"]) == (1.0, 1.0)
    assert (two["speedup"], two["efficiency"]) == (1.75, 0.88)
    assert "speedup" not in four


def test_a_failed_run_is_a_row_with_its_reason_on_one_line():
    row = fill_row(plan_rows(2, [1], [])[0], Result(
        "oddsgate", "saturation", "failed", reason="RuntimeError: exited with 1:\nTrace\n"
                                                   "ValueError: bad | path"))
    assert row["status"] == "failed"
    assert row["reason"] == "RuntimeError: exited with 1: ... ValueError: bad / path"
    assert one_line("") == ""
    row = fill_row(plan_rows(2, [1], [])[0], Result("oddsgate", "saturation", "ok",
                                                     notes=["not even the first step held"]))
    assert row["status"] == "no step held" and "first step" in row["reason"]


def test_the_table_has_a_row_per_configuration_and_marks_lower_bounds():
    rows = plan_rows(2, [1, 2, 4], [1])
    rows[0] = fill_row(rows[0], _result(800, 160_000, every_step=True))
    rows[1] = fill_row(rows[1], _result(1400, 280_000))
    annotate(rows)
    md = table_md(rows, MACHINE, PARAMS)
    assert "AMD EPYC, 2 cores" in md and "abc1234" in md
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 4  # the header, then one per configuration
    assert lines[1].startswith("| 1 worker | 1 | >= 160,000 | >=160k | >= 800 |")
    assert "| 280,000 | 280k | 1,400 | 140,000 |" in lines[2]
    assert lines[3] == "| 4 workers | 4 | skipped: 2 cores |" + " |" * 16
    assert lines[4].startswith("| 1 node x 1 worker behind one HAProxy | 1 | planned")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_plot_series_per_kind_with_linear_and_skipped():
    rows = plan_rows(2, [1, 2, 4, 8], [1, 2])
    rows[0] = fill_row(rows[0], _result(800, 160_000))
    rows[1] = fill_row(rows[1], _result(1400, 280_000))
    rows[5] = fill_row(rows[5], _result(500, 100_000, every_step=True))
    series = plot_series(annotate(rows))
    workers = series["workers"]
    assert workers["x"] == [1, 2] and workers["held"] == [160_000, 280_000]
    assert workers["linear"] == [160_000, 320_000]
    assert workers["skipped"] == [4, 8]
    assert series["nodes"]["x"] == [2] and series["nodes"]["lower_bound"] == [True]
    assert series["nodes"]["linear"] == [100_000]
    assert series["workers"]["runs"] == []  # rows not combined carry no runs
    rows[0] = combine(rows[0], [fill_row(plan_rows(2, [1], [])[0], _result(800, 160_000)),
                                fill_row(plan_rows(2, [1], [])[0], _result(900, 170_000))])
    assert plot_series(rows)["workers"]["runs"] == [[1, 160_000], [1, 170_000]]


def test_repeated_runs_make_one_row_from_the_median_run_and_show_every_run():
    row = plan_rows(2, [1], [])[0]
    runs = [fill_row(row, _result(900, 180_000)), fill_row(row, _result(3000, 600_000)),
            fill_row(row, _result(1500, 300_000, every_step=True))]
    one = combine(row, runs)
    assert one["held_deliveries_per_s"] == 300_000 and one["runs"] == 3
    assert every_run(one) == "180k, 600k, >=300k"
    two = combine(row, runs[:2])  # an even count: the lower middle, the conservative pick
    assert two["held_deliveries_per_s"] == 180_000
    none_held = fill_row(row, Result("oddsgate", "saturation", "ok",
                                     notes=["not even the first step held"]))
    three = combine(row, [none_held, runs[1]])
    assert three["held_deliveries_per_s"] == 600_000 and every_run(three) == "-, 600k"
    assert combine(row, [none_held])["status"] == "no step held"
    assert combine(row, [])["status"] == "skipped"
