"""How every oddsgate process writes its log lines: readable text, or one JSON object a line.

`OG_LOG_FORMAT` (gateway/config.py) chooses, for the supervisor, its workers,
the demo and the other commands alike, and for HAProxy's request log
(haproxy/render.py; the supervisor relays HAProxy's lines through its own
logging, supervisor/services.py). Text stays the default: an operator reading
a terminal or `journalctl` reads it. JSON is for a log pipeline:

    {"time": "2026-11-27T19:31:02.417Z", "level": "WARNING",
     "logger": "oddsgate.supervisor", "role": "supervisor", "index": null,
     "pid": 4242, "message": "worker 1 (pid 4250) died (signal 9); ...",
     "worker": 1}

`time` is UTC with milliseconds; `role` says which process wrote it
(`supervisor`, `worker`, `haproxy`, `demo`, or the command's name) and
`index` the worker's number where there is one. The fields a call site adds
with `extra=` (`worker`, `topic`, `conn_id`, ...) follow, each under its own
key, so a pipeline filters on them instead of parsing the message. An
exception's traceback is in `exc`.

Session tokens are kept out the same way in both formats: the redaction
filter (supervisor/redact.py) rewrites each record, message and fields,
before any formatter sees it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

from gateway.config import Settings
from supervisor import redact

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"

# Attributes this module sets on a record: its writer when it is not this process.
RECORD_ROLE = "og_role"
RECORD_INDEX = "og_index"


class _Identity:
    """Which process this is; set once at start (`set_process`), read by every line."""

    role = "oddsgate"
    index: int | None = None


_identity = _Identity()


def set_process(role: str, index: int | None = None) -> None:
    """Name this process in its JSON lines: `role`, and `index` for a worker."""
    _identity.role = role
    _identity.index = index


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call site added with `extra=` (not this module's own)."""
    return {key: value for key, value in redact.record_fields(record).items()
            if key not in (RECORD_ROLE, RECORD_INDEX)}


def _utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside strings are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "role": getattr(record, RECORD_ROLE, _identity.role),
            "index": getattr(record, RECORD_INDEX, _identity.index),
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            line.setdefault(key, value)  # a field never hides one of the above
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return orjson.dumps(line, default=str,
                            option=orjson.OPT_NON_STR_KEYS).decode()


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {log_format!r}: not one of {', '.join(FORMATS)}")


def configured_format() -> str:
    """OG_LOG_FORMAT, checked (ConfigError naming it when it is neither text nor json)."""
    return str(Settings.env_value("log_format"))


def configure(log_format: str, *, verbose: bool = False, role: str = "oddsgate",
              index: int | None = None, stream: IO[str] | None = None) -> logging.Handler:
    """The process's one log handler: `stream` (stderr) in `log_format`, tokens redacted.

    Replaces any handler the root logger had, so calling it again (the demo
    moving its log into a file) leaves one.
    """
    set_process(role, index)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(log_format))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    redact.install(root)
    return handler


def emit(logger: logging.Logger, level: int, message: str, fields: dict[str, Any], *,
         role: str, pid: int | None = None) -> None:
    """Log a line another process wrote (HAProxy's), under its role and pid.

    `fields` become the record's fields (one that would hide a LogRecord
    attribute is dropped); `message` is not %-formatted.
    """
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(
        logger.name, level, role, 0, message, (), None,
        extra={k: v for k, v in fields.items() if k not in redact.STANDARD_ATTRIBUTES})
    setattr(record, RECORD_ROLE, role)
    setattr(record, RECORD_INDEX, None)
    if pid is not None:
        record.process = pid
    logger.handle(record)
