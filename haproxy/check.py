"""`haproxy -c`: HAProxy's own verdict on a configuration, before anything runs it.

HAProxy knows its grammar better than any validation here, so every rendered
file passes through it before a start or a reload, and a refusal carries
HAProxy's own message. The check runs on a path, or on the text from a
temporary file in a fresh private directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from haproxy.errors import HAProxyConfigError, HAProxyError

log = logging.getLogger(__name__)

DEFAULT_HAPROXY = "/usr/sbin/haproxy"  # Debian's; /usr/sbin is not on every user's PATH


def find_haproxy(haproxy: str | None = None) -> str:
    """The haproxy binary: the one given, else on PATH, else Debian's /usr/sbin/haproxy."""
    path = haproxy or shutil.which("haproxy") or DEFAULT_HAPROXY
    if not os.access(path, os.X_OK):
        raise HAProxyError(f"haproxy not found or not executable: {path}")
    return path


def check(config: str | os.PathLike[str], *, haproxy: str | None = None,
          strict: bool = False, timeout: float = 30.0) -> None:
    """Run `haproxy -c` on a config; HAProxyConfigError with HAProxy's output if refused.

    `config` is a path (an os.PathLike, or a str without a newline) or the
    config text itself (a str with newlines, checked from a temporary file).
    `strict` adds `-dW`: warnings fail too, which is what the tests want of
    the shipped template. Otherwise warnings are logged and accepted.
    """
    binary = find_haproxy(haproxy)
    if isinstance(config, str) and "\n" in config:
        with tempfile.TemporaryDirectory(prefix="oddsgate-haproxy-check-") as tmp:
            path = Path(tmp) / "haproxy.cfg"
            path.write_text(config)
            _run_check(binary, path, strict, timeout, label="the config text")
    else:
        path = Path(config)
        if not path.is_file():
            raise HAProxyConfigError(f"no HAProxy config at {path}")
        _run_check(binary, path, strict, timeout, label=str(path))


def _run_check(binary: str, path: Path, strict: bool, timeout: float, label: str) -> None:
    argv = [binary, "-c", *(["-dW"] if strict else []), "-f", str(path)]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HAProxyError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise HAProxyConfigError(
            f"haproxy refused {label} (exit {done.returncode}):\n{output or '(no output)'}"
        )
    warnings = [line for line in output.splitlines() if "[WARNING]" in line]
    for line in warnings:
        log.warning("haproxy -c %s: %s", label, line)
