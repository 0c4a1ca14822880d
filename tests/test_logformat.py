"""OG_LOG_FORMAT: readable text by default, one JSON object a line for a log pipeline.

The JSON lines of a whole node (supervisor, workers, HAProxy relayed) are
checked in tests/test_deploy.py, on the node whose /metrics the dashboard is
checked against; here the formatter, the CLI's set-up in a real process, and
HAProxy's own lines through the relay.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap

import orjson
import pytest

from gateway.auth import issue_token
from gateway.config import ConfigError, Settings
from supervisor import logformat
from supervisor.services import relay_haproxy_line
from tests.conftest import ROOT

JWT = issue_token("a-secret-long-enough-for-hs256-keys", "p1", "s1")


@pytest.fixture
def capture():
    """The root logger configured as a process would be, into a buffer; restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logformat._identity.role,
             logformat._identity.index)
    buffers: list[io.StringIO] = []

    def configure(log_format: str, **kwargs) -> io.StringIO:
        buffer = io.StringIO()
        logformat.configure(log_format, stream=buffer, **kwargs)
        buffers.append(buffer)
        return buffer

    yield configure
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    logformat.set_process(saved[2], saved[3])


def lines(buffer: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_line_has_the_fixed_keys_then_the_fields(capture) -> None:
    out = capture("json", role="worker", index=3)
    logging.getLogger("oddsgate.hub").warning("resetting %s (%s)", "odds:1:39:1", "gap",
                                              extra={"topic": "odds:1:39:1"})
    (line,) = lines(out)
    assert list(line)[:7] == ["time", "level", "logger", "role", "index", "pid", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line
    assert line["level"] == "WARNING" and line["logger"] == "oddsgate.hub"
    assert (line["role"], line["index"], line["pid"]) == ("worker", 3, os.getpid())
    assert line["message"] == "resetting odds:1:39:1 (gap)"
    assert line["topic"] == "odds:1:39:1"


def test_json_fields_are_redacted_and_never_hide_a_fixed_key(capture) -> None:
    out = capture("json", role="supervisor")
    log = logging.getLogger("oddsgate.test")
    log.info("request %s", f"/ws?token={JWT}", extra={"url": f"/ws?token={JWT}",
                                                      "nested": {"a": 1}})
    log.info("odd values", extra={"when": object(), "level": "FAKE", "role": "FAKE"})
    first, second = lines(out)
    assert JWT not in str(first)
    assert first["message"] == "request /ws?token=REDACTED"
    assert first["url"] == "/ws?token=REDACTED" and first["nested"] == {"a": 1}
    assert second["when"].startswith("<object object")  # not JSON: its str()
    assert (second["level"], second["role"]) == ("INFO", "supervisor")


def test_json_exception_is_one_line_with_the_traceback_redacted(capture) -> None:
    out = capture("json")
    try:
        raise ValueError(f"cannot route /v1/snapshot?token={JWT}")
    except ValueError:
        logging.getLogger("oddsgate.worker").exception("request failed")
    text = out.getvalue()
    assert text.count("\n") == 1 and JWT not in text
    (line,) = lines(out)
    assert line["level"] == "ERROR" and line["message"] == "request failed"
    assert "ValueError: cannot route /v1/snapshot?token=REDACTED" in line["exc"]


def test_text_stays_the_readable_layout(capture) -> None:
    out = capture("text")
    logging.getLogger("oddsgate.supervisor").info("worker %d started", 1,
                                                  extra={"worker": 1})
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO "
                        rf"oddsgate\.supervisor\[{os.getpid()}\] worker 1 started\n",
                        out.getvalue()), out.getvalue()


def test_configure_twice_leaves_one_handler(capture) -> None:
    capture("text")
    out = capture("json")
    logging.getLogger("x").warning("once")
    assert len(logging.getLogger().handlers) == 1 and len(lines(out)) == 1


def test_log_format_setting_is_checked() -> None:
    assert Settings.env_value("log_format", {}) == "text"
    assert Settings.env_value("log_format", {"OG_LOG_FORMAT": "json"}) == "json"
    with pytest.raises(ConfigError, match="OG_LOG_FORMAT='xml': must be one of text, json"):
        Settings.env_value("log_format", {"OG_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="OG_LOG_FORMAT"):
        Settings.from_env({"OG_LOG_FORMAT": "JSON", "OG_ALLOW_ANONYMOUS": "1"})


def test_a_bad_log_format_stops_any_command_with_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "supervisor.cli", "config"], cwd=ROOT,
                          env={**os.environ, "OG_LOG_FORMAT": "xml"}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "oddsgate: OG_LOG_FORMAT='xml': must be one of text, json"]


def test_cli_json_logging_in_a_real_process() -> None:
    """What test_redact checks of the text format, in JSON: every line an object."""
    script = textwrap.dedent(f"""
        import logging
        from supervisor.cli import setup_logging
        setup_logging(verbose=True, role="worker")
        from supervisor.logformat import set_process
        set_process("worker", 2)
        logging.getLogger("websockets.server").warning("< GET %s HTTP/1.1", "/ws?token={JWT}")
        logging.getLogger("oddsgate.server").info("closing %s", "c-1",
                                                  extra={{"conn_id": "c-1"}})
        try:
            raise ValueError("cannot route /v1/snapshot?topic=t&token=opaque-2")
        except ValueError:
            logging.getLogger("oddsgate.worker").exception("request failed")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=True,
                          env={**os.environ, "OG_LOG_FORMAT": "json"})
    records = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert len(records) == 3, done.stderr
    assert JWT not in done.stderr and "opaque-2" not in done.stderr
    assert {(r["role"], r["index"]) for r in records} == {("worker", 2)}
    assert records[0]["message"] == "< GET /ws?token=REDACTED HTTP/1.1"
    assert records[1]["conn_id"] == "c-1"
    assert "token=REDACTED" in records[2]["exc"]


# -- HAProxy's lines, relayed --------------------------------------------------------


def test_relay_turns_a_json_request_line_into_fields(capture) -> None:
    out = capture("json", role="supervisor")
    relay_haproxy_line('{"client":"127.0.0.1:5","status":101,"Ta":3,'
                       '"request":"GET /ws?token=REDACTED HTTP/1.1"}', pid=4321)
    relay_haproxy_line("[WARNING]  (77) : Server gateway/w0 is DOWN", pid=4321)
    relay_haproxy_line("[ALERT]    (77) : backend 'gateway' has no server available!", 4321)
    relay_haproxy_line("{not json: kept as it came", pid=4321)
    request, down, alert, odd = lines(out)
    assert request["role"] == "haproxy" and request["pid"] == 4321
    assert request["logger"] == "oddsgate.haproxy" and request["level"] == "INFO"
    assert request["message"] == "GET /ws?token=REDACTED HTTP/1.1 101"
    assert (request["status"], request["Ta"], request["client"]) == (101, 3, "127.0.0.1:5")
    assert (down["level"], alert["level"]) == ("WARNING", "ERROR")
    assert odd["message"] == "{not json: kept as it came"


def test_relay_in_text_keeps_haproxys_line_and_redacts_again(capture) -> None:
    out = capture("text", role="supervisor")
    relay_haproxy_line(f"127.0.0.1:5 [27/Nov/2026:19:00:00.000] players \"GET /?t={JWT}\"",
                       pid=99)
    text = out.getvalue()
    assert "oddsgate.haproxy[99] 127.0.0.1:5 [27/Nov/2026:19:00:00.000] players" in text
    assert JWT not in text and '"GET /?t=REDACTED"' in text
