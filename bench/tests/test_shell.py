"""The `shell` scenario's figures and its report section, without a browser.

No timing is asserted: only what the pieces compute from given loads.
"""

from __future__ import annotations

import math
import sys

import pytest

from bench import report
from bench.harness import Params, Result
from bench.scenarios import shell

PMAP = {
    "high_value": ["odds:1:39:1", "odds:1:2:1"],
    "sports": [
        {"id": 1, "market_level_leagues": [2, 39]},
        {"id": 2, "market_level_leagues": []},
        {"id": 3, "market_level_leagues": [7]},
        {"id": 4, "market_level_leagues": [8]},
        {"id": 5, "market_level_leagues": [9]},
        {"id": 6, "market_level_leagues": [10]},
        {"id": 7, "market_level_leagues": [11]},
    ],
}


def _load(fresh: float | None, *, event: float | None = None, violations: int = 0,
          failed: str | None = None, js_transfer: int = 10_000) -> dict:
    marks = {"html": 10.0, "script": 50.0}
    if fresh is not None:
        marks |= {"first-render": fresh - 1, "all-snapshots": fresh}
    if event is not None:
        marks["first-event"] = event
    out = {"marks": marks, "violations": violations,
           "counts": {"seq_order": violations} if violations else {},
           "html_bytes": {"transfer": 2_000, "encoded": 1_800, "decoded": 4_400},
           "js_bytes": {"transfer": js_transfer, "encoded": 9_700, "decoded": 35_000}}
    if failed:
        out["failed"] = failed
    return out


def test_default_topics_mirror_the_page():
    # high-value first, then market 1 of each sport's first market-level league; six at most
    assert shell.default_topics(PMAP) == [
        "odds:1:39:1", "odds:1:2:1", "odds:3:7:1", "odds:4:8:1", "odds:5:9:1", "odds:6:10:1"]
    assert shell.default_topics({}) == []
    busiest = ["odds:1:2:1", "odds:9:1", "odds:9:2", "odds:9:3"]
    assert shell.page_topics({"high_value": ["odds:1:2:1"]}, busiest, hot=2) == [
        "odds:1:2:1", "odds:9:1", "odds:9:2"]


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]
    assert shell.percentile(values, 0.5) == 50
    assert shell.percentile(values, 0.99) == 99
    assert shell.percentile(values, 1.0) == 100
    assert shell.percentile([3.0, 1.0, 2.0], 0.99) == 3  # under 100 values: the max
    assert shell.percentile([], 0.5) is None


def test_load_figures_from_what_the_page_reports():
    raw = {"timings": {"script": 51.25, "all-snapshots": 300.04, "first-event": 420.0},
           "html": {"transfer": 2110, "encoded": 1810, "decoded": 4459, "end": 12.3},
           "js": {"transfer": 0, "encoded": 10338, "decoded": 34968, "end": 40.0},
           "topics": None, "fcp": 99.0, "violations": 0, "counts": {}, "first_latency": 7.26}
    fig = shell.load_figures(raw)
    assert fig["marks"] == {"script": 51.2, "all-snapshots": 300.0, "first-event": 420.0,
                            "html": 12.3, "js": 40.0, "fcp": 99.0}
    assert fig["js_bytes"] == {"transfer": 0, "encoded": 10338, "decoded": 34968}
    assert "topics_bytes" not in fig
    assert fig["first_event_latency_ms"] == 7.3


def test_summary_over_loads():
    loads = [_load(100.0 + i, event=200.0 + i) for i in range(20)]
    loads[3] = _load(100.0, event=250.0, violations=2, js_transfer=0)
    s = shell.summarise(loads)
    assert (s["loads"], s["failed"], s["fresh_odds_reached"]) == (20, 0, 20)
    assert s["marks"]["all-snapshots"] == {"count": 20, "p50_ms": 109.0, "p95_ms": 118.0,
                                           "p99_ms": 119.0, "max_ms": 119.0}
    assert s["marks"]["first-event"]["max_ms"] == 250.0
    assert "ws-open" not in s["marks"]  # no load reached it: no row of made-up numbers
    assert s["fresh_odds_p99_ms"] == 119.0
    assert (s["violations_total"], s["violations"]) == (2, {"seq_order": 2})
    assert s["js_bytes"] == {"transfer": 10_000, "encoded": 9_700, "decoded": 35_000}
    assert shell.fits_budget(s) is True
    assert shell.fits_budget(s, budget_ms=110.0) is False


def test_a_load_that_never_shows_odds_is_a_failure_not_a_gap():
    loads = [_load(100.0, event=150.0) for _ in range(9)]
    loads.append(_load(None, failed="not done in 15s (reached: html, script): timeout"))
    s = shell.summarise(loads)
    assert (s["failed"], s["fresh_odds_reached"]) == (1, 9)
    assert s["failures"] == ["not done in 15s (reached: html, script): timeout"]
    assert s["marks"]["all-snapshots"]["count"] == 9
    # the slowest load of ten is the p99: it never got there
    assert s["fresh_odds_p99_ms"] is None
    assert shell.fits_budget(s) is False
    assert shell.fits_budget(shell.summarise([])) is None
    # one late load in 200 is within the 1% the p99 leaves out
    many = [_load(100.0) for _ in range(199)] + [_load(None, failed="x")]
    assert shell.summarise(many)["fresh_odds_p99_ms"] == 100.0
    assert math.isinf(shell.percentile([1.0, math.inf], 0.99))


def _result(variant: str, loads: list[dict], mobile: bool = False) -> Result:
    figures = shell.summarise(loads)
    if mobile:
        figures |= {"fits_budget": shell.fits_budget(figures),
                    "budget_ms": shell.FRESH_ODDS_BUDGET_MS}
    return Result("oddsgate", shell.NAME, "ok", variant=variant,
                  params={"topics": ["odds:1:2:1"]}, figures=figures)


def test_report_section_and_target_row():
    cold = _result(shell.COLD, [_load(200.0, event=300.0) for _ in range(4)])
    mobile = _result(shell.MOBILE, [_load(1400.0, event=1500.0), _load(1900.0, event=2000.0)],
                     mobile=True)
    lines = report.shell_lines([cold, mobile])
    text = "\n".join(lines)
    assert f"| {shell.COLD} (4 loads) | {shell.MOBILE} (2 loads) |" in text
    assert "| **every topic's odds on screen (fresh odds)** (`all-snapshots`) " \
           "| 200 / 200 / 200 | 1,400 / 1,900 / 1,900 |" in text
    assert "| WebSocket open (`ws-open`) | - | - |" in text
    assert "**does not fit** the 1,500 ms budget" in text
    targets = "\n".join(report.target_lines([cold, mobile]))
    assert "| fresh odds on screen p99, player shell (mobile (Slow 4G), 2 page loads) " \
           "| <= 1,500 ms | 1,900 ms | **missed**, 1.3x off |" in targets
    fast = _result(shell.MOBILE, [_load(900.0, event=950.0)], mobile=True)
    assert "| 900 ms | **met** |" in "\n".join(report.target_lines([fast]))
    failed = _result(shell.MOBILE, [_load(None, failed="x")], mobile=True)
    assert "| never | **missed** (a load never got there) |" in \
        "\n".join(report.target_lines([failed]))
    assert report.shell_lines([Result("oddsgate", shell.NAME, "unavailable", reason="x")]) == []
    # the mark reached by fewer loads than ran says how many
    partial = _result(shell.COLD, [_load(200.0, event=300.0), _load(250.0)])
    assert "| 300 / 300 / 300 (1) |" in "\n".join(report.shell_lines([partial]))


def test_shell_has_a_time_estimate():
    quick, full = Params.for_mode(True), Params.for_mode(False)
    assert 0 < quick.estimate_s(["shell"]) < full.estimate_s(["shell"])


class _Oddsgate:
    name = "oddsgate"


def test_without_a_browser_it_reports_itself_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(shell, "CHROMIUM", tmp_path / "no-chromium")
    [result] = shell.run(None, _Oddsgate())
    assert (result.status, result.scenario) == ("unavailable", shell.NAME)
    assert "no-chromium" in result.reason
    chromium = tmp_path / "chromium"
    chromium.touch()
    monkeypatch.setattr(shell, "CHROMIUM", chromium)
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # import fails
    [result] = shell.run(None, _Oddsgate())
    assert result.status == "unavailable" and "playwright" in result.reason
    assert "shell / oddsgate: **unavailable**: the playwright package is missing" in \
        "\n".join(report.other_lines([result]))


def test_loads_stop_when_every_page_fails(monkeypatch):
    outcomes = iter([_load(100.0), _load(None, failed="a"), _load(None, failed="b"),
                     _load(120.0), _load(None, failed="c"), _load(None, failed="d"),
                     _load(None, failed="e"), _load(130.0)])
    monkeypatch.setattr(shell, "_load", lambda page, url, errors: next(outcomes))
    assert len(shell._loads(None, "url", [], 4)) == 4  # two failures in a row go on
    with pytest.raises(RuntimeError, match="3 page loads in a row failed: e"):
        shell._loads(None, "url", [], 4)
