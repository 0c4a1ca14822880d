"""No session token in a log line the node's Python processes write."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gateway.auth import issue_token
from supervisor.redact import MARKER, redact, shown_url
from tests.conftest import ROOT

JWT = issue_token("a-secret-long-enough-for-hs256-keys", "p1", "s1")


@pytest.mark.parametrize(("text", "expected"), [
    (f"GET /ws?token={JWT}&topics=odds:1 HTTP/1.1",
     "GET /ws?token=REDACTED&topics=odds:1 HTTP/1.1"),
    (f"< Cookie: theme=dark; og_session={JWT}; lang=en",
     "< Cookie: theme=dark; og_session=REDACTED; lang=en"),
    ('Cookie: og_session="opaque"', 'Cookie: og_session="REDACTED"'),
    ("GET /?TOKEN=opaque&x=1", "GET /?TOKEN=REDACTED&x=1"),
    (f"bad frame from {JWT}", "bad frame from REDACTED"),
    ("token expired; 3 tokens left", "token expired; 3 tokens left"),  # no value: no change
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("rediss://app:pw@[::1]:6380", "rediss://app:***@[::1]:6380"),
    ("unix:///run/og/redis.sock?db=1&password=pw", "unix:///run/og/redis.sock?db=1&password=***"),
    ("redis-cluster://10.0.0.5:7000,10.0.0.6:7000", "redis-cluster://10.0.0.5:7000,10.0.0.6:7000"),
    ("redis://10.0.0.5:6379", "redis://10.0.0.5:6379"),
])
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    """What the CLIs print when Redis is unreachable (keys, links, webhooks, feed)."""
    assert shown_url(url) == shown


def test_cli_logging_redacts_every_logger_and_traceback() -> None:
    """The CLI's handlers filter records from any logger, websockets' own included."""
    script = textwrap.dedent(f"""
        import logging
        from supervisor.cli import setup_logging
        setup_logging(verbose=True)
        logging.getLogger("websockets.server").warning("< GET %s HTTP/1.1", "/ws?token={JWT}")
        logging.getLogger("websockets.server").warning("< Cookie: og_session=%s", "opaque-1")
        try:
            raise ValueError("cannot route /v1/snapshot?topic=t&token=opaque-2")
        except ValueError:
            logging.getLogger("oddsgate.worker").exception("request failed")
        logging.getLogger("oddsgate.supervisor").info("worker %d up", 3)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=True)
    err = done.stderr
    assert JWT not in err and "opaque-1" not in err and "opaque-2" not in err, err
    assert err.count(MARKER) == 3, err
    assert "ValueError: cannot route /v1/snapshot?topic=t&token=REDACTED" in err
    assert "worker 3 up" in err
