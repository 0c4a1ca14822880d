"""The `oddsgate` argparse tree: one parser, each subcommand's flags loaded when it runs.

The feed's flags come from feed/synthetic/cli.py, whose imports (redis,
uvloop) would otherwise be paid by every `oddsgate status` a deploy script
runs; a subprocess shows which modules a command really imported.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import contextlib, io, sys
from supervisor.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(code, "redis" in sys.modules, "feed.synthetic.cli" in sys.modules)
"""


def imported_by(*argv: str) -> tuple[int, bool, bool]:
    """(exit code, redis imported, the feed's CLI imported) of `oddsgate ARGV`."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=True)
    code, redis, feed = done.stdout.split()
    return int(code), redis == "True", feed == "True"


def test_commands_without_the_feed_do_not_load_it() -> None:
    assert imported_by("config") == (0, False, False)
    assert imported_by("haproxy-config", "--workers", "1", "--stats-socket", "/tmp/s.sock") \
        == (0, False, False)


def test_the_feed_loads_its_flags_when_it_is_the_command() -> None:
    assert imported_by("feed", "--help") == (0, True, True)
    assert imported_by("feed", "--rate", "0") == (2, True, True)
