"""`python -m bench`: run the scenarios against oddsgate and its peers, print the table.

    python -m bench --quick                      # under 2 minutes
    python -m bench                              # the full run, about 11 minutes
    python -m bench --scenario steady --peers plain-ws --factor 0.006
    python -m bench scaling                      # 1, 2, 4, 8 workers; 1 and 2 nodes

Everything is started here on loopback and stopped before it returns: a
private Redis per run, the servers, the feed, the load generators. A run
that fails is recorded as failed with its reason; the bench goes on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench import report
from bench.calibrate import loopback_send_cost_us
from bench.harness import Harness, Params, Result, machine_busy
from bench.machine import describe, raise_nofile
from bench.peers import install
from bench.scenarios import SCENARIOS, SESSIONS, STANDALONE, drain
from bench.scenarios.connect import FD_MARGIN
from bench.systems import NODE, ROOT, SYSTEMS, Oddsgate, OddsgateNode, System

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = [name for name in SYSTEMS if name != "oddsgate"]
OURS = ("oddsgate", NODE)  # oddsgate itself: bare workers, and a whole node behind HAProxy
# oddsgate with other settings, run beside it (issue 4: micro-batching measured
# before and after): one frame per event instead of one `batch` per player per turn.
UNBATCHED = "oddsgate-unbatched"
# Issue "Hardening" 7: the kernel takes a stalled player's backlog (megabytes)
# instead of the worker, where it would be coalesced. Not in a plan:
# `--scenario spike --peers oddsgate-no-lowat` runs it beside oddsgate.
NO_LOWAT = "oddsgate-no-lowat"
VARIANTS = {UNBATCHED: {"OG_MAX_BATCH": "1"},
            NO_LOWAT: {"OG_SOCKET_NOTSENT_LOWAT_BYTES": "0"}}

# What runs by default, per mode: scenario -> systems.
QUICK_PLAN = {
    "steady": ["oddsgate", NODE, *[p for p in PEERS if p != "python-socketio"]],
    "saturation": ["oddsgate"],
    "connect": ["oddsgate"],
    "subscribe": ["oddsgate"],
    "drain": [NODE],
}
# Left out of the quick run, and why (the table says so).
QUICK_LEAVES_OUT = {("steady", "python-socketio"): "the slowest peer; in the full run only",
                    ("connect", NODE): "in the full run only (the quick run's 2 minutes)",
                    ("shell", "oddsgate"): "in the full run only (the quick run's 2 minutes)",
                    ("spike", "oddsgate"): "in the full run only (the quick run's 2 minutes)",
                    ("failover", "oddsgate"): "in the full run only (the quick run's 2 minutes)",
                    ("clicks", "oddsgate"): "in the full run only (the quick run's 2 minutes); "
                                            "`--quick --scenario clicks` runs a short one",
                    ("webhooks", "oddsgate"): "in the full run only (the quick run's 2 minutes)",
                    ("stats", "oddsgate"): "in the full run only (the quick run's 2 minutes)"}
FULL_PLAN = {
    "steady": ["oddsgate", NODE, *PEERS],
    "saturation": ["oddsgate", *PEERS],
    # peers' spikes (tens of seconds of backlog each) gave way to the A/B in the
    # 10-minute budget: `--scenario spike --peers plain-ws node-socket.io` runs them
    "spike": ["oddsgate", UNBATCHED],
    "connect": ["oddsgate", NODE, *PEERS],
    "subscribe": ["oddsgate"],
    "drain": [NODE],
    "shell": ["oddsgate"],
    "failover": ["oddsgate"],
    "clicks": ["oddsgate"],
    "webhooks": ["oddsgate"],
    "stats": ["oddsgate"],
}
QUIET_CORES = 0.25  # other work below which `--wait-quiet` starts a run
QUICK_BUDGET_S = 112
FULL_BUDGET_S = 700  # every scenario (clicks, webhooks, stats, failover too), every peer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short run (< 2 minutes)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only these scenarios (repeatable)")
    parser.add_argument("--peers", nargs="*", metavar="PEER",
                        help=f"peers to compare ({', '.join([*PEERS, *VARIANTS])}, or none); "
                             "default: the mode's plan")
    parser.add_argument("--no-oddsgate", action="store_true", help="peers only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--factor", type=float, help="scale of the seed's peak event rate")
    parser.add_argument("--connections", type=int, help="players in steady/saturation/spike")
    parser.add_argument("--workers", type=int, help="oddsgate worker processes")
    parser.add_argument("--loadgens", type=int, help="load-generator processes")
    parser.add_argument("--check-share", type=float, metavar="SHARE",
                        help="share of players whose events are checked (PROTOCOL.md §5) and "
                             "timed in steady and saturation; the others only count them "
                             "(default 0.1; 1 checks every one)")
    parser.add_argument("--seed", type=int, help="seed of the universe and the draws")
    parser.add_argument("--measure", type=float, dest="measure_s", help="seconds measured")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy the oddsgate worker during steady (default: full run only)")
    parser.add_argument("--oddsgate-tree", type=Path, default=ROOT, metavar="DIR",
                        help="run the workers from this checkout (default: this one), e.g. a "
                             "`git archive` of another commit for an A/B run")
    parser.add_argument("--oddsgate-commit", metavar="REV",
                        help="run the workers from this commit (git archive into the workdir), "
                             "e.g. HEAD to leave uncommitted edits out")
    parser.add_argument("--node-setting", action="append", metavar="OG_NAME=VALUE",
                        help="a setting of the node under `oddsgate run --haproxy` "
                             "(oddsgate+haproxy), e.g. OG_DRAIN_WINDOW_MS=10000 (repeatable)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not install peers; use what is there")
    parser.add_argument("--budget", type=float, help="seconds before remaining runs are skipped")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other work on the "
                             "machine to stop (the wait is outside the time budget)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the servers' logs and Redis dirs (kept anyway if a run failed)")
    return parser


def plan_for(args: argparse.Namespace) -> dict[str, list[str]]:
    base = QUICK_PLAN if args.quick else FULL_PLAN
    plan = {}
    for scenario in args.scenario or list(base):
        systems = base.get(scenario, ["oddsgate"])
        if args.peers is not None:
            peers = [p for p in args.peers if p != "none"]
            for peer in peers:
                if peer not in SYSTEMS and peer not in VARIANTS:
                    raise SystemExit(f"unknown peer {peer!r}; known: "
                                     f"{', '.join([*PEERS, *VARIANTS])}")
            systems = [*([s for s in systems if s in OURS] or ["oddsgate"]), *peers]
        if args.no_oddsgate:
            systems = [s for s in systems if s not in OURS]
        plan[scenario] = systems
    return plan


def jobs_for(plan: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """(system, [scenario]) in the order they run: oddsgate's scenarios first, then the
    peers scenario by scenario, so a run cut short by the time budget loses peers' extras
    first."""
    systems = list(dict.fromkeys(s for names in plan.values() for s in names))
    jobs: list[tuple[str, list[str]]] = []

    def add(system: str, scenarios: list[str]) -> None:
        wanted = [s for s in scenarios if system in plan.get(s, [])]
        if wanted:
            jobs.append((system, wanted))

    if "oddsgate" in systems:
        for scenario in SCENARIOS:
            add("oddsgate", [scenario])
    if NODE in systems:  # steady and drain share one session (one population); connect apart
        add(NODE, list(drain.SESSION))
        add(NODE, ["connect"])
    peers = [s for s in systems if s not in OURS]
    for scenario in SCENARIOS:
        for system in peers:
            add(system, [scenario])
    return jobs


def _sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)  # unwind: every context manager stops what it started


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scaling"]:  # `python -m bench scaling`: bench/scaling.py
        from bench import scaling

        return scaling.main(argv[1:])
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    budget = args.budget or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
    mode = "quick" if args.quick else "full"
    nofile = raise_nofile()
    plan = plan_for(args)
    wanted_systems = {s for systems in plan.values() for s in systems}

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    installing = 0.0
    if args.no_install:
        avail = install.Availability(peers_venv=None if install.VENV.exists() else "not installed",
                                     node=None if (install.NODE_DIR / "node_modules").is_dir()
                                     else "not installed",
                                     nats=None if install.nats_server_path() else "not installed")
    else:
        install_started = time.monotonic()
        avail = install.ensure(want_node="node-socket.io" in wanted_systems,
                               want_nats="nats-server" in wanted_systems)
        for line in avail.log:
            log(line)
        # A fresh clone installs the peers first (npm, a venv, nats-server): a one-off
        # that is not the bench's to budget, like --wait-quiet's waits.
        installing = time.monotonic() - install_started
    params = Params.for_mode(
        args.quick, factor=args.factor, connections=args.connections, workers=args.workers,
        loadgens=args.loadgens, seed=args.seed, measure_s=args.measure_s,
        check_share=args.check_share,
        node_env=node_settings(args.node_setting),
        profile=args.profile if args.profile is not None else not args.quick,
    )
    if nofile < max(params.connect_counts) + 1000:
        log(f"RLIMIT_NOFILE is {nofile} and cannot be raised: connections are spread over "
            f"more processes, and single-process peers skip the larger connect stages")
    background = background_cores()
    send_us = loopback_send_cost_us()
    log(f"machine: {background:.2f} cores busy before the bench; a small loopback send "
        f"costs {send_us} us of CPU")
    harness = Harness(params, avail, log=log, nofile=nofile)
    harness.tree = args.oddsgate_tree.resolve()
    commit = None
    if args.oddsgate_commit:
        harness.tree, commit = export_commit(args.oddsgate_commit, harness.workdir / "tree")
    # what ran is what the tree held at the start (the checkout may move meanwhile)
    machine = describe(nofile, avail.python if not avail.peers_venv else None,
                       tree=harness.tree)
    if commit:
        machine["git"] = {"commit": commit, "dirty": False, "tree": str(harness.tree)}
    machine["background_cores"] = round(background, 2)
    machine["loopback_send_us"] = send_us
    log(f"bench {mode}: factor {params.factor:g} -> {params.rate:.0f} events/s, "
        f"{params.connections} players, oddsgate {machine['git'].get('commit') or harness.tree}, "
        f"workdir {harness.workdir}")

    results: list[Result] = []
    waited = installing  # outside the budget
    if args.quick and args.peers is None:
        results += [Result(system, scenario, "skipped", reason=why)
                    for (scenario, system), why in QUICK_LEAVES_OUT.items()
                    if scenario in plan]
    for name, scenarios in jobs_for(plan):
        system = _make(name, harness, params)
        unavailable = system.unavailable()
        if unavailable:
            results += [Result(name, s, "unavailable", reason=unavailable) for s in scenarios]
            continue
        if args.wait_quiet:
            waited += wait_quiet(args.wait_quiet, log)  # outside the budget
        estimate = params.estimate_s(
            scenarios, None if name == "oddsgate" else OddsgateNode.player_capacity(nofile)
            if name == NODE else nofile - FD_MARGIN, node=name == NODE)
        if time.monotonic() - started - waited + estimate > budget:
            results += [Result(name, s, "skipped",
                               reason=f"would end past the {budget:.0f}s time budget "
                                      f"(about {estimate:.0f}s more)")
                        for s in scenarios]
            continue
        log(f"{name}: {', '.join(scenarios)}")
        try:
            if isinstance(system, OddsgateNode) and scenarios[0] in drain.SESSION:
                results += drain.run_node_session(harness, system, scenarios)
            else:
                run = SESSIONS.get(scenarios[0]) or STANDALONE[scenarios[0]]
                results += run(harness, system)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            log(f"    failed: {traceback.format_exc().strip().splitlines()[-1]}")
            results += [Result(name, s, "failed", reason=f"{type(exc).__name__}: {str(exc)[:400]}")
                        for s in scenarios]
    order = list(dict.fromkeys(name for name, _ in jobs_for(plan)))
    rank = {s: i for i, s in enumerate(SCENARIOS)}
    results.sort(key=lambda r: (rank.get(r.scenario, 99), order.index(r.system)
                                if r.system in order else 99))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path, md_path = report.write(args.out, stamp, mode, machine, params.to_dict() | {
        "rate": params.rate}, results, [])
    plots: list[str] = []
    if not avail.peers_venv:
        plots, why = report.plot(avail.python, json_path, args.out, mode)
        if why:
            log(f"plots not made: {why}")
        if plots:
            report.write(args.out, stamp, mode, machine, params.to_dict() | {
                "rate": params.rate}, results, plots)
    print()
    print(md_path.read_text())
    log(f"results: {json_path} and {md_path}")
    if args.keep_workdir or any(r.status == "failed" for r in results):
        log(f"servers' logs kept in {harness.workdir}")
    else:
        shutil.rmtree(harness.workdir, ignore_errors=True)
    return 0


def background_cores(seconds: float = 1.0) -> float:
    """Cores busy on the machine over `seconds` (call it while nothing of ours runs)."""
    busy0, t0 = machine_busy(), time.monotonic()
    time.sleep(seconds)
    return (machine_busy() - busy0) / (time.monotonic() - t0)


def wait_quiet(limit_s: float, log, threshold: float = QUIET_CORES) -> float:
    """Wait (up to `limit_s`) until other work leaves the machine; return the time waited."""
    started = time.monotonic()
    busy = background_cores()
    while busy > threshold and time.monotonic() - started < limit_s:
        log(f"    waiting for the machine: {busy:.2f} cores busy with other work")
        time.sleep(4.0)
        busy = background_cores()
    return time.monotonic() - started


def export_commit(rev: str, into: Path) -> tuple[Path, str]:
    """The product packages as of `rev`, extracted under `into`; and the short hash."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit, "gateway", "feed", "supervisor",
                              "haproxy"],
                             cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into, commit


def node_settings(pairs: list[str] | None) -> dict[str, str] | None:
    """`--node-setting OG_NAME=VALUE` flags as an environment."""
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("OG_"):
            raise SystemExit(f"--node-setting {pair!r}: expected OG_NAME=VALUE")
        env[key] = value
    return env or None


def _make(name: str, harness: Harness, params: Params) -> System:
    if name == "oddsgate":
        return Oddsgate(harness.workdir, harness.avail, workers=params.workers, tree=harness.tree)
    if name == NODE:
        return OddsgateNode(harness.workdir, harness.avail, workers=params.node_workers,
                            tree=harness.tree, env=params.node_env)
    if name in VARIANTS:
        system = Oddsgate(harness.workdir, harness.avail, workers=params.workers,
                          tree=harness.tree, env=VARIANTS[name])
        system.name = name
        settings = " ".join(f"{k}={v}" for k, v in VARIANTS[name].items())
        system.description = f"oddsgate with {settings}"
        return system
    return SYSTEMS[name](harness.workdir, harness.avail)


if __name__ == "__main__":
    sys.exit(main())
