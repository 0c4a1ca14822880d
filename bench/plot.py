"""Plots of a bench run; run with the bench env's Python (it has matplotlib).

    bench/peers/.venv/bin/python bench/plot.py bench/results/latest-full.json bench/results full
    bench/peers/.venv/bin/python bench/plot.py --scaling bench/results/scaling-2core.json out.png

Writes latency-vs-rate-<mode>.png (p50/p99/p99.9 against the event rate,
from the saturation steps) and cpu-per-million-<mode>.png (server
CPU-seconds per million deliveries per system, steady and saturation's
highest held step), and prints the names it wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def latency_vs_rate(results: list[dict], out: Path, mode: str) -> str | None:
    series = [(r["system"], r["figures"].get("steps") or []) for r in results
              if r["scenario"] == "saturation" and r["status"] == "ok"]
    series = [(name, steps) for name, steps in series if steps]
    if not series:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, key, title in zip(axes, ("p50_ms", "p99_ms", "p999_ms"), ("p50", "p99", "p99.9"),
                              strict=True):
        for name, steps in series:
            xs = [s["events_per_s"] for s in steps if (s.get("latency_ms") or {}).get(key)]
            ys = [s["latency_ms"][key] for s in steps if (s.get("latency_ms") or {}).get(key)]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(f"publish-to-receipt {title}")
        ax.set_xlabel("events/s published")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[-1].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    name = f"latency-vs-rate-{mode}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def cpu_per_million(results: list[dict], out: Path, mode: str) -> str | None:
    bars: dict[str, dict[str, float]] = {}
    for r in results:
        if r["status"] != "ok" or r["scenario"] not in ("steady", "saturation"):
            continue
        value = r["figures"].get("server_cpu_s_per_million")
        if value:
            bars.setdefault(r["system"], {})[r["scenario"]] = value
    if not bars:
        return None
    systems = list(bars)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    for k, scenario in enumerate(("steady", "saturation")):
        xs = [i + (k - 0.5) * width for i in range(len(systems))]
        ys = [bars[s].get(scenario, 0) for s in systems]
        ax.bar(xs, ys, width, label="saturation (highest held)" if k else scenario)
    ax.set_xticks(range(len(systems)), systems)
    ax.set_ylabel("server CPU-seconds per million deliveries")
    ax.set_title("CPU cost of fan-out (lower is better)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    name = f"cpu-per-million-{mode}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def scaling(data: dict, png: Path) -> str:
    """`python -m bench scaling`'s plot, from the series bench.scaling.plot_series built:
    held deliveries/s (and linear from the smallest), deliveries per server CPU-second,
    and p99 at the highest rate held, against workers and against nodes."""
    series = data["series"]
    kinds = [k for k in ("workers", "nodes") if series.get(k, {}).get("x")
             or series.get(k, {}).get("skipped")]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(15, 4.2 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds, strict=True):
        s = series[kind]
        held_ax, cpu_ax, p99_ax = row
        held_ax.plot(s["x"], s["held"], marker="o", label="held (p99 <= 50 ms), median run")
        if s.get("runs"):
            held_ax.scatter([x for x, _ in s["runs"]], [y for _, y in s["runs"]], marker="x",
                            color="black", alpha=0.6, label="each run")
        for x, y, lower in zip(s["x"], s["held"], s["lower_bound"], strict=True):
            if lower:
                held_ax.annotate(">=", (x, y), textcoords="offset points", xytext=(4, 4))
        if s["linear"]:
            held_ax.plot(s["x"], s["linear"], linestyle="--", color="grey", label="linear")
        for x in s["skipped"]:
            held_ax.axvline(x, color="red", alpha=0.25)
            held_ax.annotate("skipped", (x, 0), textcoords="offset points", xytext=(2, 4),
                             fontsize=7, color="red", rotation=90)
        held_ax.set_title(f"deliveries/s held, by {kind}")
        cpu_ax.bar([str(x) for x in s["x"]], [v or 0 for v in s["per_cpu_s"]])
        cpu_ax.set_title("deliveries per server CPU-second")
        p99_ax.plot(s["x"], [v or 0 for v in s["p99_ms"]], marker="o")
        p99_ax.set_title("p99 ms at the highest rate held")
        for ax in row:
            ax.set_xlabel(kind)
            ax.grid(True, alpha=0.3)
        held_ax.set_xticks(sorted({*s["x"], *s["skipped"]}))
        p99_ax.set_xticks(s["x"])
        held_ax.set_ylim(bottom=0)
        p99_ax.set_ylim(bottom=0)
        held_ax.legend(fontsize=8)
    machine = data.get("machine", {})
    fig.suptitle(f"oddsgate scaling on {machine.get('cpu', '?')}, {machine.get('cores')} "
                 f"cores ({machine.get('date', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png.name


def main() -> int:
    if sys.argv[1] == "--scaling":
        print(scaling(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])))
        return 0
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else data.get("mode", "run")
    out.mkdir(parents=True, exist_ok=True)
    for made in (latency_vs_rate(data["results"], out, mode),
                 cpu_per_million(data["results"], out, mode)):
        if made:
            print(made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
