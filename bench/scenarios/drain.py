"""`drain`: drain a worker holding 5,000 players; time until 99% resumed elsewhere.

Needs a node under `oddsgate run` (the drain command, HAProxy's agent
checks); until the bench starts one, this reports itself skipped. No number
is ever made up here.
"""

from __future__ import annotations

from bench.harness import Harness, Result
from bench.systems import System

NAME = "drain"


def run(h: Harness, system: System) -> list[Result]:
    if system.name != "oddsgate":
        return [Result(system.name, NAME, "n/a", reason="oddsgate's drain only")]
    return [Result(system.name, NAME, "skipped",
                   reason="skipped: needs a node under `oddsgate run` with HAProxy; not "
                          "wired into the bench yet")]
