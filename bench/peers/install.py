"""Install what the peers need, once, from the package registries only.

- `bench/peers/.venv`: python-socketio, aiohttp, matplotlib, py-spy (pinned in
  requirements.txt), through pip from PyPI.
- `bench/peers/node/node_modules`: socket.io and @socket.io/redis-adapter,
  through `npm ci` from the npm registry (package-lock.json pins them).
- `nats-server`: Debian's package, through apt-get, when root.

Each step is skipped when its stamp (a hash of what it installs) matches, so a
second run costs nothing. A step that fails leaves a reason, and the peer
shows as unavailable with it in the table: the bench never fails for a peer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PEERS = Path(__file__).resolve().parent
VENV = PEERS / ".venv"
NODE_DIR = PEERS / "node"
STAMPS = PEERS / ".stamps"
INSTALL_TIMEOUT_S = 600


@dataclass
class Availability:
    """None: ready; otherwise why not."""

    peers_venv: str | None = "not checked"
    node: str | None = "not checked"
    nats: str | None = "not checked"
    log: list[str] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return VENV / "bin" / "python"

    @property
    def py_spy(self) -> Path:
        return VENV / "bin" / "py-spy"


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes() if path.exists() else b"-")
    return h.hexdigest()[:16]


def _stamped(name: str, digest: str) -> bool:
    return (STAMPS / f"{name}-{digest}").exists()


def _stamp(name: str, digest: str) -> None:
    STAMPS.mkdir(exist_ok=True)
    for old in STAMPS.glob(f"{name}-*"):
        old.unlink()
    (STAMPS / f"{name}-{digest}").touch()


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str | None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(cmd[:3])}: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"{' '.join(cmd[:3])} exited {proc.returncode}: {' | '.join(tail)}"
    return None


def install_peers_venv(log: list[str]) -> str | None:
    requirements = PEERS / "requirements.txt"
    digest = _digest(requirements)
    if _stamped("venv", digest) and (VENV / "bin" / "python").exists():
        return None
    log.append("installing bench/peers/.venv (python-socketio, aiohttp, matplotlib, py-spy)")
    if not (VENV / "bin" / "python").exists():
        # the interpreter the product runs on, not the product's venv
        base = getattr(sys, "_base_executable", None) or sys.executable
        if why := _run([base, "-m", "venv", str(VENV)]):
            return why
    if why := _run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                    "-r", str(requirements)]):
        return why
    _stamp("venv", digest)
    return None


def install_node(log: list[str]) -> str | None:
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        return "node/npm not installed (apt-get install nodejs npm)"
    digest = _digest(NODE_DIR / "package.json", NODE_DIR / "package-lock.json")
    if _stamped("node", digest) and (NODE_DIR / "node_modules").is_dir():
        return None
    log.append("installing socket.io and @socket.io/redis-adapter with npm ci")
    cmd = [npm, "ci" if (NODE_DIR / "package-lock.json").exists() else "install",
           "--no-audit", "--no-fund", "--loglevel=error"]
    if why := _run(cmd, cwd=NODE_DIR):
        return why
    _stamp("node", digest)
    return None


def nats_server_path() -> str | None:
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None)


def install_nats(log: list[str]) -> str | None:
    if nats_server_path():
        return None
    if os.geteuid() != 0:
        return "nats-server missing and not root to apt-get install it"
    if shutil.which("apt-get") is None:
        return "nats-server missing and no apt-get on this machine"
    log.append("installing nats-server with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    why = _run(["apt-get", "install", "-y", "-qq", "nats-server"], env=env)
    if why:
        _run(["apt-get", "update", "-qq"], env=env)
        why = _run(["apt-get", "install", "-y", "-qq", "nats-server"], env=env)
    if why:
        return f"apt-get install nats-server failed: {why}"
    return None if nats_server_path() else "nats-server not found after installing it"


def ensure(want_node: bool = True, want_nats: bool = True, want_venv: bool = True) -> Availability:
    avail = Availability()
    if want_venv:
        avail.peers_venv = install_peers_venv(avail.log)
    if want_node:
        avail.node = install_node(avail.log)
    if want_nats:
        avail.nats = install_nats(avail.log)
    return avail
