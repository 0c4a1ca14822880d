"""`python -m bench scaling`: how oddsgate's held rate grows with workers and nodes.

Issue 14, point 6. Each row is the `saturation` scenario (its ladder, then
the bisection to 10%; bench/scenarios/saturation.py) on one configuration,
from nothing (its own Redis, servers, feed and load generators):

- `workers`: 1, 2, 4, 8 bare workers (`python -m supervisor.cli worker`,
  players spread over their ports, as the bench's `oddsgate`). A count above
  the machine's cores is not run: its row says `skipped: N cores`, since
  workers sharing cores with each other, Redis and the load generators
  measure the machine, not the workers.
- `nodes`: one node against two behind one HAProxy (`oddsgate run --haproxy`
  supervisors on one Redis, `--workers-per-node` each, an edge HAProxy in
  front rendered as `oddsgate haproxy-config --node ...` renders it:
  every worker of every node on one consistent-hash ring, each checked by
  its own node's agent). Players carry `og_session` cookies, so the edge
  places them by its hash; both rows go through the edge, so the only
  difference is the second node.

Per row: deliveries/s held (p99 <= 50 ms, >= 95% delivered), per worker,
per server CPU-second (the workers' own CPU for `workers` rows; for `nodes`
rows the supervisors' and every HAProxy's too), p99 at the highest rate
held, what limited the first rate missed, and the speed-up and efficiency
against the one-worker (one-node) row. Writes
`bench/results/scaling-<cores>core.{md,json,png}` (the machine description
in each), so a run on a bigger machine adds its own files beside these.

    python -m bench scaling                         # what fits here, twice; ~6 minutes
    python -m bench scaling --workers 1 2 4 8 --budget 900
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.calibrate import loopback_send_cost_us
from bench.harness import Harness, Params, Result
from bench.machine import describe, raise_nofile
from bench.peers import install
from bench.scenarios.session import run_saturation_session
from bench.systems import LOOPBACK, Oddsgate, OddsgateNode, System, Target

RESULTS = Path(__file__).resolve().parent / "results"
WORKER_COUNTS = [1, 2, 4, 8]
NODE_COUNTS = [1, 2]
# x4 apart (the bisection closes the gap to 10%), up to where a 2-core machine
# held ~1M deliveries/s with batches of tens of events a frame.
STEPS = [2, 8, 32, 128, 512]
BUDGET_S = 420.0


# -- the plan and the rows (pure) ---------------------------------------------


def plan_rows(cores: int, worker_counts: list[int] = WORKER_COUNTS,
              node_counts: list[int] = NODE_COUNTS, workers_per_node: int = 1) -> list[dict]:
    """Every configuration asked for, in order: `planned`, or `skipped` with why."""
    rows = []
    for n in worker_counts:
        rows.append(_row("workers", n, 1, n, cores))
    for n in node_counts:
        rows.append(_row("nodes", n * workers_per_node, n, workers_per_node, cores))
    return rows


def _row(kind: str, workers: int, nodes: int, per_node: int, cores: int) -> dict:
    label = (f"{workers} worker{'s' if workers > 1 else ''}" if kind == "workers"
             else f"{nodes} node{'s' if nodes > 1 else ''} x {per_node} worker"
                  f"{'s' if per_node > 1 else ''} behind one HAProxy")
    row = {"kind": kind, "label": label, "workers": workers, "nodes": nodes,
           "workers_per_node": per_node, "status": "planned", "reason": ""}
    if workers > cores:
        row["status"] = "skipped"
        row["reason"] = f"skipped: {cores} cores"
    return row


def fill_row(row: dict, result: Result) -> dict:
    """A planned row with what its saturation run measured."""
    out = dict(row)
    fig = result.figures or {}
    out["status"] = result.status if fig.get("held_rate") is not None or result.status != "ok" \
        else "no step held"
    out["reason"] = one_line(result.reason) or (
        "" if fig.get("held_rate") is not None else "; ".join(result.notes) or "no step held")
    out["notes"] = list(result.notes)
    if fig.get("held_rate") is None:
        out["steps"] = fig.get("steps", [])
        return out
    held = fig["deliveries_per_s"]
    workers = row["workers"]
    out.update({
        "held_events_per_s": fig["held_rate"],
        "held_deliveries_per_s": held,
        "frames_per_s": fig.get("frames_per_s"),
        "events_per_frame": (round(held / fig["frames_per_s"], 2) if fig.get("frames_per_s")
                             else None),
        "lower_bound": any(n.startswith("every step held") for n in result.notes),
        "deliveries_per_s_per_worker": round(held / workers),
        "deliveries_per_server_cpu_s": fig.get("deliveries_per_server_cpu_s"),
        "server_cores": fig.get("server_cores"),
        "p99_ms": (fig.get("latency_ms") or {}).get("p99_ms"),
        "p50_ms": (fig.get("latency_ms") or {}).get("p50_ms"),
        "loadgen_cores": fig.get("loadgen_cores"),
        "redis_cores": fig.get("redis_cores"),
        # Redis CPU per thousand events: the publish script, and one delivery per
        # subscribed worker (compare rows to see what each subscriber adds)
        "redis_cpu_ms_per_1000_events": (round(fig["redis_cores"] / fig["held_rate"] * 1e6, 2)
                                         if fig.get("redis_cores") and fig.get("held_rate")
                                         else None),
        "machine_cores_busy": fig.get("machine_cores_busy"),
        "other_cores": fig.get("other_cores"),
        "checked_connections": fig.get("checked_connections"),
        "open_connections": fig.get("open_connections"),
        "violations_total": fig.get("violations_total"),
        "limited_by": _first_missed_limit(fig.get("steps", [])),
        "steps": fig.get("steps", []),
    })
    return out


def one_line(text: str) -> str:
    """A failure's reason for a table cell: its first line and, from a traceback, its last."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} ... {lines[-1]}".replace("|", "/")


def combine(row: dict, runs: list[dict], budget: float = BUDGET_S) -> dict:
    """One row from several runs of a configuration: the figures of the run whose held
    rate is the median (the lower middle one of an even count: the conservative pick),
    every run's held deliveries/s beside them."""
    if not runs:
        return {**row, "status": "skipped", "reason": f"would end past the {budget:.0f}s budget"}
    measured = sorted((r for r in runs if r.get("held_deliveries_per_s")),
                      key=lambda r: r["held_deliveries_per_s"])
    if not measured:
        return {**runs[-1], "runs": len(runs), "held_runs": [None] * len(runs)}
    pick = measured[(len(measured) - 1) // 2]
    return {**pick, "runs": len(runs),
            "held_runs": [r.get("held_deliveries_per_s") for r in runs],
            "lower_bound_runs": [bool(r.get("lower_bound")) for r in runs]}


def _first_missed_limit(steps: list[dict]) -> str:
    """What ran out on the lowest rate that missed (or, if none missed, on the top one)."""
    missed = [s for s in steps if s.get("multiplier") is not None and not _held_step(s)]
    pick = min(missed, key=lambda s: s["multiplier"]) if missed else (
        max(steps, key=lambda s: s.get("multiplier") or 0) if steps else None)
    return (pick or {}).get("limited_by") or ""


def _held_step(step: dict) -> bool:
    p99 = (step.get("latency_ms") or {}).get("p99_ms")
    share = step.get("delivered_share")
    return p99 is not None and p99 <= 50 and (share is None or share >= 0.95)


def annotate(rows: list[dict]) -> list[dict]:
    """Speed-up and efficiency of each measured row against its kind's smallest one
    (1 worker; 1 node): held deliveries/s over the base's, and that over the size ratio."""
    for kind, size in (("workers", "workers"), ("nodes", "nodes")):
        measured = [r for r in rows if r["kind"] == kind and r.get("held_deliveries_per_s")]
        if not measured:
            continue
        base = min(measured, key=lambda r: r[size])
        for r in measured:
            speedup = r["held_deliveries_per_s"] / base["held_deliveries_per_s"]
            r["speedup"] = round(speedup, 2)
            r["efficiency"] = round(speedup / (r[size] / base[size]), 2)
    return rows


def _n(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table_md(rows: list[dict], machine: dict, params: dict) -> str:
    """The markdown report: the machine, the table, what each row's stop was."""
    git = machine.get("git") or {}
    lines = [
        "# oddsgate bench: scaling",
        "",
        f"{machine.get('date', '')} on {machine.get('cpu', '?')}, {machine.get('cores')} cores, "
        f"{machine.get('memory_gib')} GiB, Linux {machine.get('kernel', '')}, Python "
        f"{machine.get('python', '')}; oddsgate {git.get('commit', '')}"
        f"{' (uncommitted changes)' if git.get('dirty') else ''}. Redis, servers, feed and "
        f"load generators all share this machine, over loopback; "
        f"{machine.get('background_cores', 0):.2f} cores were busy with other work before "
        "the run.",
        "",
        f"Each row: the `saturation` scenario from nothing ({params.get('connections')} "
        f"players x {params.get('topics_per_conn')} topics, ladder x"
        f"{', x'.join(f'{s:g}' for s in params.get('steps', []))} of "
        f"{params.get('base_rate')} events/s, then bisected to 10%; held = p99 <= "
        f"{params.get('p99_limit_ms'):g} ms and >= 95% delivered); {params.get('loadgens')} "
        f"load-generator processes, {params.get('check_share'):g} of the players checked "
        "(PROTOCOL.md §5) and timed, all counted.",
        "",
        "| configuration | workers | held deliveries/s | every run | held events/s | "
        "deliveries/s per "
        "worker | deliveries per server CPU-s | server cores | p99 ms at held | speed-up | "
        "efficiency | limited by (first rate missed) | events per frame | Redis CPU ms per "
        "1,000 events | loadgen cores | machine cores busy | other work, cores | checked / "
        "open players | violations |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"
        "---:|",
    ]
    for r in rows:
        if not r.get("held_deliveries_per_s"):
            why = r.get("reason") or "-"
            cell = why if why.startswith(r["status"]) else f"{r['status']}: {why}"
            lines.append(f"| {r['label']} | {r['workers']} | {cell} |" + " |" * 16)
            continue
        bound = ">= " if r.get("lower_bound") else ""
        lines.append(
            f"| {r['label']} | {r['workers']} | {bound}{_n(r['held_deliveries_per_s'])} | "
            f"{every_run(r)} | {bound}{_n(r['held_events_per_s'])} | "
            f"{_n(r['deliveries_per_s_per_worker'])} | "
            f"{_n(r.get('deliveries_per_server_cpu_s'))} | {_n(r.get('server_cores'), 2)} | "
            f"{_n(r.get('p99_ms'), 1)} | {_n(r.get('speedup'), 2)} | "
            f"{_n(r.get('efficiency'), 2)} | {r.get('limited_by') or '-'} | "
            f"{_n(r.get('events_per_frame'), 1)} | "
            f"{_n(r.get('redis_cpu_ms_per_1000_events'), 1)} | "
            f"{_n(r.get('loadgen_cores'), 2)} | {_n(r.get('machine_cores_busy'), 2)} | "
            f"{_n(r.get('other_cores'), 2)} | "
            f"{_n(r.get('checked_connections'))} / {_n(r.get('open_connections'))} | "
            f"{_n(r.get('violations_total'))} |")
    lines += ["", "Per row, where the ladder stopped (the run shown):", ""]
    for r in rows:
        if r["status"] == "skipped":
            continue
        notes = "; ".join(r.get("notes") or []) or r.get("reason") or ""
        lines.append(f"- **{r['label']}**: {notes}")
    lines += [
        "",
        "`every run`: the held deliveries/s of each run of the configuration, in the "
        "order they ran; the row's figures are the median run's. `>=`: every step held, "
        "so the figure is a lower bound. `deliveries per server "
        "CPU-s` is the workers' own CPU for bare workers; for nodes it also holds the "
        "supervisors' and every HAProxy's (the edge and each node's own). Speed-up and "
        "efficiency compare each row with the one-worker (one-node) row of its kind: "
        "efficiency 1.0 is linear. `other work`: CPU that no process of the run accounts "
        "for (other jobs on a shared machine, kernel threads) during the held step; a row "
        "with much of it measured the neighbours too.",
    ]
    return "\n".join(lines) + "\n"


def every_run(row: dict) -> str:
    """Each run's held deliveries/s, `>=` on a lower bound, `-` where none held."""
    helds = row.get("held_runs") or [row.get("held_deliveries_per_s")]
    bounds = row.get("lower_bound_runs") or [bool(row.get("lower_bound"))] * len(helds)
    return ", ".join("-" if h is None else f"{'>=' if b else ''}{h / 1000:,.0f}k"
                     for h, b in zip(helds, bounds, strict=False))


def plot_series(rows: list[dict]) -> dict:
    """What the plot draws, per kind: sizes, held deliveries/s, per worker CPU-s, p99;
    and the sizes skipped (drawn as marks on the axis)."""
    out: dict = {}
    for kind, size in (("workers", "workers"), ("nodes", "nodes")):
        mine = [r for r in rows if r["kind"] == kind]
        measured = [r for r in mine if r.get("held_deliveries_per_s")]
        base = min(measured, key=lambda r: r[size]) if measured else None
        out[kind] = {
            "x": [r[size] for r in measured],
            "held": [r["held_deliveries_per_s"] for r in measured],
            "lower_bound": [bool(r.get("lower_bound")) for r in measured],
            "per_cpu_s": [r.get("deliveries_per_server_cpu_s") for r in measured],
            "p99_ms": [r.get("p99_ms") for r in measured],
            "linear": [base["held_deliveries_per_s"] * r[size] / base[size]
                       for r in measured] if base else [],
            "skipped": [r[size] for r in mine if r["status"] == "skipped"],
            # every run of every configuration: the spread the median hides
            "runs": [[r[size], h] for r in mine for h in (r.get("held_runs") or [])
                     if h is not None],
        }
    return out


# -- several nodes behind one HAProxy -----------------------------------------


class NodeFleet(System):
    """`count` nodes (`oddsgate run --haproxy`, `per_node` workers each) on one Redis, and
    one edge HAProxy in front of all their workers (haproxy.settings `for_nodes`)."""

    protocol = "oddsgate"
    has_snapshots = True

    def __init__(self, workdir: Path, avail: install.Availability, count: int, per_node: int,
                 tree: Path) -> None:
        super().__init__(workdir, avail)
        self.name = f"oddsgate-{count}node-x{per_node}"  # a run dir's name: no spaces
        self.description = (f"{count} `oddsgate run --haproxy` nodes x {per_node} workers, "
                            "one edge HAProxy in front")
        self.count = count
        self.per_node = per_node
        self.tree = tree
        self.nodes: list[OddsgateNode] = []
        self.edge = None
        self.edge_dir: Path | None = None

    def workers(self) -> int:
        return self.count * self.per_node

    def start(self, redis_url: str) -> Target:
        from haproxy.settings import HAProxySettings, NodeTarget
        from supervisor.embedded_redis import free_port
        from supervisor.haproxy import HAProxyProcess

        self.feed_address = redis_url
        # HAProxy's sockets need short paths (a unix socket's is at most ~100 bytes)
        self.edge_dir = Path(tempfile.mkdtemp(prefix="og-fleet-"))
        targets = []
        for i in range(self.count):
            name = f"node-{chr(ord('a') + i)}"
            workdir = self.edge_dir / name
            workdir.mkdir(parents=True, exist_ok=True)
            node = OddsgateNode(workdir, self.avail, tree=self.tree, env={"OG_NODE": name})
            node.count = self.per_node  # OddsgateNode's own minimum (2) is the drain's
            self.nodes.append(node)
            node.start(redis_url)
            targets.append(NodeTarget(name, LOOPBACK, node.base_port, self.per_node,
                                      node.agent_port, i + 1))
        edge = self.edge = HAProxyProcess(HAProxySettings.for_nodes(
            targets, bind_port=free_port(), stats_socket=str(self.edge_dir / "stats.sock")),
            self.edge_dir / "haproxy")
        edge.start()
        wanted = {f"{t.name}-w{w}" for t in targets for w in range(t.workers)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                servers = edge.servers()
                if set(servers) >= wanted and all(servers[s]["status"] == "UP" for s in wanted):
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"edge HAProxy: not every server UP within 30s: "
                               f"{edge.servers() if edge.running else 'not running'}")
        backends = [(LOOPBACK, t.base_port + w) for t in targets for w in range(t.workers)]
        return Target([(LOOPBACK, edge.settings.bind_port)], self.protocol, via="haproxy",
                      backends=backends, token_secret=OddsgateNode.SECRET)

    def processes(self) -> list[psutil.Process]:
        out = [p for node in self.nodes for p in node.processes()]
        if self.edge is not None and self.edge.pid:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(self.edge.pid)
                out += [proc, *proc.children(recursive=True)]
        return out

    def stop(self) -> None:
        if self.edge is not None:
            with contextlib.suppress(Exception):
                self.edge.stop()
            self.edge = None
        for node in self.nodes:
            node.stop()
        self.nodes = []
        if self.edge_dir is not None:
            shutil.rmtree(self.edge_dir, ignore_errors=True)


# -- the run -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench scaling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=WORKER_COUNTS,
                        help="bare-worker counts (default 1 2 4 8; above the cores: skipped)")
    parser.add_argument("--nodes", type=int, nargs="*", default=NODE_COUNTS,
                        help="node counts behind one HAProxy (default 1 2; none: no node rows)")
    parser.add_argument("--workers-per-node", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1_000, help="players per row")
    parser.add_argument("--loadgens", type=int, help="load-generator processes (default 2)")
    parser.add_argument("--steps", type=float, nargs="+", default=STEPS,
                        help="the ladder's multipliers of the base rate")
    parser.add_argument("--factor", type=float, help="scale of the seed's peak event rate")
    parser.add_argument("--check-share", type=float, help="share of players checked")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help="seconds; a row that would end past it is skipped")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot-python", type=Path,
                        help="a Python with matplotlib (default: the bench env's)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per configuration, in turn; a row shows the median run "
                             "(the lower middle of an even count) and every run's figure")
    parser.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                        help="before each row, wait up to this long for other work on the "
                             "machine to stop (outside the budget; 0: do not wait)")
    parser.add_argument("--keep-workdir", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    nofile = raise_nofile()
    cores = os.cpu_count() or 1
    avail = install.Availability(peers_venv=None if install.VENV.exists() else "not installed",
                                 node="not needed", nats="not needed")
    params = Params.for_mode(True, factor=args.factor, loadgens=args.loadgens,
                             check_share=args.check_share,
                             saturation_connections=args.connections,
                             saturation_steps=list(args.steps))
    from bench.cli import background_cores, wait_quiet

    background = background_cores()
    machine = describe(nofile)
    machine["background_cores"] = round(background, 2)
    machine["loopback_send_us"] = loopback_send_cost_us()
    harness = Harness(params, avail, log=log, nofile=nofile)
    rows = plan_rows(cores, args.workers, args.nodes or [], args.workers_per_node)
    planned = ', '.join(f"{r['label']} ({r['status']})" for r in rows)
    log(f"scaling on {cores} cores: {planned}")
    failed = False
    waited = 0.0  # outside the budget
    runs: list[list[dict]] = [[] for _ in rows]
    for round_ in range(args.repeat):  # configurations in turn, so drift hits them alike
        for i, row in enumerate(rows):
            if row["status"] == "skipped":
                continue
            if args.wait_quiet:
                waited += wait_quiet(args.wait_quiet, log)
            estimate = params.estimate_s(["saturation"]) + (10 * row["nodes"] if row["kind"] ==
                                                            "nodes" else 0)
            if time.monotonic() - started - waited + estimate > args.budget:
                log(f"{row['label']}: run {round_ + 1} would end past the "
                    f"{args.budget:.0f}s budget")
                continue
            system: System = (Oddsgate(harness.workdir, avail, workers=row["workers"])
                              if row["kind"] == "workers" else
                              NodeFleet(harness.workdir, avail, row["nodes"],
                                        row["workers_per_node"], harness.tree))
            if row["kind"] == "workers":
                system.name = f"oddsgate-{row['workers']}w"
            log(f"{row['label']} (run {round_ + 1} of {args.repeat}):")
            try:
                result = run_saturation_session(harness, system)[0]
            except Exception as exc:  # recorded, and the next row runs
                failed = True
                log(f"    failed: {type(exc).__name__}: {exc}")
                result = Result(system.name, "saturation", "failed",
                                reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            runs[i].append(fill_row(row, result))
    for i, row in enumerate(rows):
        if row["status"] != "skipped":
            rows[i] = combine(row, runs[i], args.budget)
    annotate(rows)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = args.out / f"scaling-{cores}core"
    run_params = {"connections": params.saturation_connections,
                  "topics_per_conn": params.topics_per_conn, "steps": params.saturation_steps,
                  "base_rate": round(params.rate, 1), "factor": params.factor,
                  "p99_limit_ms": params.p99_limit_ms, "loadgens": params.loadgens,
                  "check_share": params.check_share, "repeat": args.repeat,
                  "settle_s": params.saturation_settle_s,
                  "measure_s": params.saturation_measure_s,
                  "seconds": round(time.monotonic() - started, 1),
                  "waited_for_quiet_s": round(waited, 1)}
    data = {"kind": "scaling", "stamp": stamp, "machine": machine, "params": run_params,
            "rows": rows, "series": plot_series(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = table_md(rows, machine, run_params)
    plot_python = args.plot_python or install.VENV / "bin" / "python"
    png = base.with_suffix(".png")
    why = draw(plot_python, json_path, png)
    md += (f"\n![scaling]({png.name})\n" if not why else f"\nNo plot: {why}\n")
    base.with_suffix(".md").write_text(md)
    print()
    print(md)
    log(f"results: {json_path}, {base.with_suffix('.md')}"
        f"{'' if why else ', ' + str(png)}")
    if failed or args.keep_workdir:
        log(f"servers' logs kept in {harness.workdir}")
    else:
        shutil.rmtree(harness.workdir, ignore_errors=True)
    return 1 if failed else 0


def draw(python: Path, json_path: Path, png: Path) -> str | None:
    """bench/plot.py's scaling plot, with a Python that has matplotlib; None or why not."""
    if not Path(python).exists():
        return f"{python} not found (`python -m bench` installs the bench env; or --plot-python)"
    script = Path(__file__).resolve().parent / "plot.py"
    try:
        proc = subprocess.run([str(python), str(script), "--scaling", str(json_path), str(png)],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["plot failed"])[-1]
    return None


if __name__ == "__main__":
    sys.exit(main())
