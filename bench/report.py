"""Results on disk (JSON, Markdown, plots) and the table printed at the end.

Every number in the Markdown comes from a Result's figures; where a run did
not happen the table says why (skipped, unavailable, failed, n/a), never a
number.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.harness import Result

TARGETS = {
    "deliveries_per_server_cpu_s": 300_000,
    "p50_ms": 1.0,
    "p99_ms": 5.0,
    "idle_conn_bytes": 10_000,
    "subscribe_p99_ms": 10.0,
}
FANOUT = ("steady", "saturation", "spike")
CONTENDED_CORES = 0.3  # CPU used by processes outside the run above which we flag it


def _num(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _kb(value: float | int | None) -> str:
    return "-" if value is None else f"{value / 1000:,.1f} KB"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _lat(lat: dict | None) -> list[str]:
    lat = lat or {}
    return [_num(lat.get(k), 2) for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms")]


def _violations(fig: dict) -> str:
    total = fig.get("violations_total")
    if total is None:
        return "-"
    if not total:
        return "0"
    detail = ", ".join(f"{k} {v}" for k, v in sorted(fig.get("violations", {}).items()))
    return f"**{total}** ({detail})"


def _other(fig: dict) -> str:
    other = fig.get("other_cores")
    if other is None:
        return "-"
    text = _num(other, 2)
    return f"**{text}**" if other > CONTENDED_CORES else text


def fanout_table(results: list[Result]) -> list[str]:
    rows = [
        "| scenario | system | players | events/s | deliveries/s | delivered | p50 ms | p99 ms "
        "| p99.9 ms | max ms | deliveries / server CPU-s | server CPU-s / M deliveries "
        "| RSS / conn | violations | server cores | loadgen cores | softirq + steal cores "
        "| other cores |",
        "|" + "---|" * 18,
    ]
    for r in results:
        if r.scenario not in FANOUT or r.status != "ok" or not r.figures.get("latency_ms"):
            continue
        f = r.figures
        name = {"saturation": f"saturation, highest held ({r.variant})",
                "spike": "spike (healthy players)"}.get(r.scenario, r.scenario)
        rows.append("| " + " | ".join([
            name, r.system, _num(f.get("connections")), _num(f.get("events_per_s")),
            _num(f.get("deliveries_per_s")), _pct(f.get("delivered_share")),
            *_lat(f.get("latency_ms")),
            _num(f.get("deliveries_per_server_cpu_s")), _num(f.get("server_cpu_s_per_million"), 1),
            _kb(f.get("rss_per_conn_bytes")), _violations(f), _num(f.get("server_cores"), 2),
            _num(f.get("loadgen_cores"), 2),
            _num((f.get("softirq_cores") or 0) + (f.get("steal_cores") or 0), 2), _other(f),
        ]) + " |")
    return rows


def saturation_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r.scenario != "saturation" or r.status != "ok":
            continue
        f = r.figures
        steps = "; ".join(
            f"x{s['multiplier']:g} {_num(s['events_per_s'])} ev/s: p99 "
            f"{_num((s['latency_ms'] or {}).get('p99_ms'), 1)} ms, "
            f"{_pct(s.get('delivered_share'))} delivered"
            for s in f.get("steps", []))
        if f.get("held_rate") is not None:
            head = (f"held {_num(f.get('held_rate'))} events/s = "
                    f"{_num(f.get('deliveries_per_s'))} deliveries/s, "
                    f"{_num(f.get('deliveries_per_s_per_server_core'))} deliveries/s per server "
                    f"core")
        else:
            head = "no step held"
        out.append(f"- **{r.system}** ({r.variant}): {head}. Stopped: "
                   f"{r.notes[0] if r.notes else '-'}. Ladder: {steps}.")
    return out


def spike_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r.scenario != "spike" or r.status != "ok":
            continue
        f = r.figures
        before = (f.get("before") or {}).get("latency_ms") or {}
        growth = f.get("rss_growth_bytes") or 0
        out.append(
            f"- **{r.system}**: {f.get('stalled_connections')} players stalled (of "
            f"{f.get('spike_followers')} following `{f.get('spike_topic')}`); healthy players' "
            f"p99 {_num(f['latency_ms'].get('p99_ms'), 1)} ms during the spike against "
            f"{_num(before.get('p99_ms'), 1)} ms in steady; server growth over the spike per "
            f"stalled player (an upper bound: healthy players' queues are in it when the "
            f"server falls behind) {_kb(f.get('memory_per_stalled_conn_bytes'))} in RSS (total "
            f"{growth / 2**20:+,.1f} MiB) and "
            f"{_kb(f.get('kernel_queue_per_stalled_conn_bytes'))} in kernel send queues; "
            f"{_pct(f.get('delivered_share'))} of the spike's deliveries arrived in time "
            f"(limited by {f.get('limited_by')}).")
    return out


def connect_table(results: list[Result]) -> list[str]:
    rows = ["| system | stage | open | conns/s | connect p50 ms | connect p99 ms "
            "| RSS / idle conn | server processes | failures |", "|" + "---|" * 9]
    for r in results:
        if r.scenario != "connect" or r.status != "ok":
            continue
        f = r.figures
        lat = f.get("connect_latency_ms") or {}
        failures = sum((f.get("failures") or {}).values())
        rows.append(f"| {r.system} | {r.variant} | {_num(f.get('open_connections'))} | "
                    f"{_num(f.get('connections_per_s'))} | {_num(lat.get('p50_ms'), 2)} | "
                    f"{_num(lat.get('p99_ms'), 2)} | {_kb(f.get('rss_per_conn_bytes'))} | "
                    f"{r.params.get('workers', 1)} | {failures} |")
    return rows


def subscribe_table(results: list[Result]) -> list[str]:
    rows = ["| system | wave | players | snapshots | p50 ms | p99 ms | p99.9 ms | max ms "
            "| errors (whole run) | violations |", "|" + "---|" * 10]
    for r in results:
        if r.scenario != "subscribe" or r.status != "ok":
            continue
        f = r.figures
        errors = ", ".join(f"{k} {v}" for k, v in sorted((f.get("errors") or {}).items()))
        rows.append(f"| {r.system} | {r.variant} | {_num(r.params.get('connections'))} | "
                    f"{_num(f.get('snapshots'))} | " + " | ".join(_lat(f.get("subscribe_ms")))
                    + f" | {errors or '0'} | {_violations(f)} |")
    return rows


def _pick(results: list[Result], scenario: str, system: str = "oddsgate") -> list[Result]:
    return [r for r in results if r.scenario == scenario and r.system == system
            and r.status == "ok"]


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "**met**"
    if not value:
        return "**missed**"
    ratio = target / value if higher_is_better else value / target
    return f"**missed**, {ratio:.1f}x off"


def target_lines(results: list[Result]) -> list[str]:
    rows = ["| target | wanted | oddsgate measured | verdict |", "|---|---|---|---|"]
    steady = _pick(results, "steady")
    if steady:
        f = steady[0].figures
        lat = f.get("latency_ms") or {}
        d = f.get("deliveries_per_server_cpu_s")
        rows.append(f"| deliveries per server CPU-second (steady) | >= 300,000 | {_num(d)} | "
                    f"{_verdict(d, TARGETS['deliveries_per_server_cpu_s'], True)} |")
        for key, wanted in (("p50_ms", "<= 1 ms"), ("p99_ms", "<= 5 ms")):
            rows.append(f"| publish-to-receipt {key[:3]} (steady) | {wanted} | "
                        f"{_num(lat.get(key), 2)} ms | "
                        f"{_verdict(lat.get(key), TARGETS[key], False)} |")
    for r in _pick(results, "connect"):
        v = r.figures.get("rss_per_conn_bytes")
        rows.append(f"| memory per idle connection ({r.variant}) | <= 10 KB | {_kb(v)} | "
                    f"{_verdict(v, TARGETS['idle_conn_bytes'], False)} |")
    for r in _pick(results, "subscribe"):
        v = (r.figures.get("subscribe_ms") or {}).get("p99_ms")
        rows.append(f"| subscribe-to-snapshot p99 ({r.variant}) | <= 10 ms | {_num(v, 2)} ms | "
                    f"{_verdict(v, TARGETS['subscribe_p99_ms'], False)} |")
    mine = [r for r in results if r.system == "oddsgate" and r.status == "ok"]
    if mine:
        total = sum(r.figures.get("violations_total") or 0 for r in mine)
        rows.append(f"| ordering violations (every oddsgate run) | 0 | {total} | "
                    f"{'**met**' if total == 0 else '**missed**'} |")
    return rows


def floor_lines(machine: dict, results: list[Result]) -> list[str]:
    send_us = machine.get("loopback_send_us")
    if not send_us:
        return []
    lines = [
        f"Floor on this machine: one small `send()` over loopback to a reader waiting in "
        f"epoll costs the sender {send_us:.1f} us of CPU (bench/calibrate.py), so no "
        f"server in any language writes more than {1e6 / send_us:,.0f} frames per "
        f"CPU-second here; 300,000 deliveries per CPU-second needs at least "
        f"{300_000 * send_us / 1e6:.1f} events per frame on average."]
    steady = _pick(results, "steady")
    if steady:
        f = steady[0].figures
        if f.get("frames_per_s") and f.get("deliveries_per_s"):
            lines[0] += (f" In steady the players received "
                         f"{f['deliveries_per_s'] / f['frames_per_s']:.2f} events per frame.")
    return lines


def profile_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        prof = r.figures.get("profile") if r.status == "ok" else None
        if not prof:
            continue
        if prof.get("status") != "ok":
            out.append(f"- profile of {r.system}: {prof.get('status')}: {prof.get('reason')}")
            continue
        out.append(f"py-spy on the {r.system} worker during `{r.scenario}` "
                   f"({prof['samples']} busy samples; collapsed stacks in "
                   f"`{prof.get('collapsed_stacks')}`). Self time is where the samples "
                   "were, C calls included (a `transport.write` counts its `send()`):")
        out.append("")
        out.append("| self | function | inclusive | function |")
        out.append("|---|---|---|---|")
        inclusive = [x for x in prof["inclusive"] if x["share"] < 0.995]
        for a, b in zip(prof["self"][:10], inclusive[:10], strict=False):
            out.append(f"| {a['share']:.1%} | `{a['function']}` | {b['share']:.1%} | "
                       f"`{b['function']}` |")
    return out


def note_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        for note in r.notes:
            if r.scenario == "saturation" and note == (r.notes[0] if r.notes else None):
                continue  # already in the ladder line
            out.append(f"- {r.scenario} / {r.system}: {note}")
    return out


def other_lines(results: list[Result]) -> list[str]:
    return [f"- {r.scenario} / {r.system}{' (' + r.variant + ')' if r.variant else ''}: "
            f"**{r.status}**: {r.reason.removeprefix('skipped: ')}"
            for r in results if r.status != "ok"]


def _tree(git: dict) -> str:
    if git.get("commit"):
        return git["commit"] + (" + local changes" if git.get("dirty") else "")
    return f"from {git.get('tree')}"


def render(machine: dict, params: dict, results: list[Result], mode: str,
           plots: list[str]) -> str:
    v = machine["versions"]
    background = machine.get("background_cores")
    lines = [
        f"# oddsgate bench: {mode} run",
        "",
        f"{machine['date']} on {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, Python {machine['python']}; "
        f"oddsgate {_tree(machine['git'])}. Redis, servers, feed and load generators all "
        "share this machine, over loopback.",
        "",
        f"Scale: factor **{params['factor']:g}** of the seed's peak (13,333 events/s) = "
        f"{params['rate']:.1f} events/s; {params['connections']:,} players x "
        f"{params['topics_per_conn']} Zipf topics (504 market topics + 50 league topics); "
        f"seed {params['seed']}; oddsgate workers: {params['workers']}; "
        f"{params['loadgens']} load-generator processes.",
        "",
    ]
    if background is not None and background > CONTENDED_CORES:
        lines += [f"**The machine was not idle**: {background:.2f} cores were busy with other "
                  "work just before the run; `other cores` below says how much during each "
                  "measurement, and figures with a bold value there are skewed.", ""]
    lines += [
        "## Fan-out", "", *fanout_table(results), "",
        *saturation_lines(results), *spike_lines(results), "",
        "## Connect", "", *connect_table(results), "",
        "## Subscribe to snapshot", "", *subscribe_table(results), "",
        "## oddsgate against its targets", "", *target_lines(results), "",
        *floor_lines(machine, results), "",
    ]
    prof = profile_lines(results)
    if prof:
        lines += ["## Where a worker's time goes", "", *prof, ""]
    notes = note_lines(results)
    if notes:
        lines += ["## Notes", "", *notes, ""]
    others = other_lines(results)
    if others:
        lines += ["## Not measured", "", *others, ""]
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    lines += [
        "## How to read this",
        "",
        "- Latency is publish-to-receipt: from the `ts` the feed stamps as it prepares a "
        "batch to the moment the player's frame is read, so it includes the feed's Redis "
        "round trip and the load generator's own queueing.",
        "- `delivered` is deliveries received over what the feed's events in the same "
        "interval should have produced (events per topic x followers); under 100% the "
        "system (or this machine) is falling behind.",
        "- Server CPU is user+system time of the server processes only; Redis, the feed "
        "and the load generators are apart. Over loopback a server's `send()` also pays for "
        "the receiving side's TCP work, so CPU per delivery is higher than on a real "
        "network. `softirq + steal` is packet work the kernel charges to no process "
        "(mostly this run's loopback traffic) plus time the hypervisor gave to other "
        "guests; `other cores` is the rest of the machine's busy time that no process of "
        "the run accounts for (kernel threads, or other jobs on the machine).",
        "- RSS / conn is the server's RSS growth since before the first player, divided by "
        "players (kernel socket buffers are not in it).",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        "",
    ]
    return "\n".join(lines)


def write(out_dir: Path, stamp: str, mode: str, machine: dict, params: dict,
          results: list[Result], plots: list[str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = out_dir / "runs"
    runs.mkdir(exist_ok=True)
    payload = {"mode": mode, "machine": machine, "params": params,
               "results": [r.to_dict() for r in results]}
    json_path = runs / f"{stamp}-{mode}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / f"latest-{mode}.json").write_text(json.dumps(payload, indent=1, default=str))
    text = render(machine, params, results, mode, plots)
    md_path = out_dir / f"latest-{mode}.md"
    md_path.write_text(text)
    (out_dir / "latest.md").write_text(text)
    return json_path, md_path


def plot(python: Path, json_path: Path, out_dir: Path, mode: str
         ) -> tuple[list[str], str | None]:
    """Run bench/plot.py with the bench env's matplotlib; return the PNG names made."""
    script = Path(__file__).resolve().parent / "plot.py"
    try:
        proc = subprocess.run([str(python), str(script), str(json_path), str(out_dir), mode],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], str(exc)
    if proc.returncode != 0:
        return [], (proc.stderr.strip().splitlines() or ["plot failed"])[-1]
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()], None
