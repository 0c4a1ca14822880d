"""The machine a run happened on, and the process limits a bench needs."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import resource
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
WANTED_NOFILE = 1_100_000


def raise_nofile(wanted: int = WANTED_NOFILE) -> int:
    """Raise RLIMIT_NOFILE as far as allowed; children (servers, load generators) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(OSError, ValueError):
        ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
        if hard < wanted and os.geteuid() == 0:
            hard = min(wanted, ceiling)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None and not os.access(cmd[0], os.X_OK):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else None
    return None


def _package(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(tree: Path) -> dict:
    def run(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        return ""

    if not (tree / ".git").exists():
        return {"commit": "", "dirty": False, "tree": str(tree)}
    return {"commit": run("rev-parse", "--short", "HEAD"), "tree": str(tree),
            "dirty": bool(run("status", "--porcelain", "--", "gateway", "feed", "supervisor"))}


def _node_package(name: str) -> str | None:
    import json

    path = ROOT / "bench" / "peers" / "node" / "node_modules" / name / "package.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())["version"]
    return None


def describe(nofile: int, peers_python: Path | None = None, tree: Path = ROOT) -> dict:
    mem = psutil.virtual_memory().total
    peer_versions = {}
    if peers_python is not None and peers_python.exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [str(peers_python), "-c",
                 "import importlib.metadata as m;"
                 "print(m.version('python-socketio'), m.version('aiohttp'))"],
                capture_output=True, text=True, timeout=20).stdout.split()
            if len(out) == 2:
                peer_versions = {"python-socketio": out[0], "aiohttp": out[1]}
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "nofile": nofile,
        "git": _git(tree),
        "versions": {
            "websockets": _package("websockets"),
            "redis-py": _package("redis"),
            "hiredis": _package("hiredis"),
            "orjson": _package("orjson"),
            "uvloop": _package("uvloop"),
            "redis-server": _version(["redis-server", "--version"]),
            "node": _version(["node", "--version"]),
            "socket.io": _node_package("socket.io"),
            "@socket.io/redis-adapter": _node_package("@socket.io/redis-adapter"),
            "nats-server": _version(["/usr/sbin/nats-server", "--version"])
            or _version(["nats-server", "--version"]),
            **peer_versions,
        },
    }
