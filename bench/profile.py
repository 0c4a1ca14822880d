"""Where a worker's CPU goes: py-spy on a live worker, summarised by function.

py-spy (installed into bench/peers/.venv) samples the worker from outside
(`--nonblocking`: the worker is never paused) and writes collapsed stacks;
idle samples (the loop waiting in epoll) are left out by py-spy, so shares
are of the worker's busy time. The summary keeps the top functions by self
time and by inclusive time; the collapsed stacks are kept beside the results
for a flame graph (e.g. `flamegraph.pl` or speedscope).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

from bench.harness import Harness
from bench.systems import System

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", f"{ROOT}/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarise(collapsed: str, top: int = 15) -> dict:
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            incl_counts[name] += count

    def table(counter: Counter[str]) -> list[dict]:
        return [{"function": name, "share": round(n / total, 4)}
                for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "self": table(self_counts), "inclusive": table(incl_counts)}


def profile_worker(h: Harness, system: System, seconds: float) -> dict:
    py_spy = h.avail.py_spy
    if h.avail.peers_venv or not py_spy.exists():
        return {"status": "unavailable", "reason": h.avail.peers_venv or "py-spy missing"}
    pids = system.server.pids()
    if not pids:
        return {"status": "failed", "reason": "no worker running"}
    out = RESULTS / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{system.name}-steady.raw"
    cmd = [str(py_spy), "record", "--pid", str(pids[0]), "--duration", str(int(seconds)),
           "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(raw)]
    h.log(f"    profiling worker {pids[0]} with py-spy for {seconds:.0f}s")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": "py-spy did not finish"}
    if proc.returncode != 0 or not raw.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        return {"status": "failed", "reason": " | ".join(tail)}
    summary = summarise(raw.read_text())
    summary["status"] = "ok"
    summary["collapsed_stacks"] = str(raw.relative_to(ROOT))
    return summary
