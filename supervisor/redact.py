"""Session tokens never reach a log line the node writes.

A player's token is a bearer credential: whoever reads it from a log can
connect as that player until it expires. It travels as `?token=` or as the
`og_session` cookie, so a request line or a header dumped by a library's
debug logging, or an exception message quoting a URL, would carry it. Rather
than trusting every call site (ours and websockets'), the CLI installs one
filter on the process's log handlers that rewrites each record before it is
formatted, its structured fields (`extra=`, which the JSON format writes
out, supervisor/logformat.py) included. HAProxy's request log is redacted
by its own log-format (see haproxy/render.py), and again here when the
supervisor relays it.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

MARKER = "REDACTED"

# `token=...` / `og_session=...` in a query string, a cookie header or free
# text (a cookie value may be quoted), up to the next separator; any name
# ending in "token" counts.
_ASSIGNMENT = re.compile(r"(?i)(token|og_session)(\s*=\s*\"?)([^\s&;,\"'<>]+)")
# A JWT wherever it appears (three base64url parts, the first a JSON header).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# What every LogRecord holds before `extra=` adds to it: anything else is a field.
STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The attributes `extra=` added to `record`: its structured fields."""
    return {key: value for key, value in record.__dict__.items()
            if key not in STANDARD_ATTRIBUTES}


def redact(text: str) -> str:
    """`text` with every session token it holds replaced by REDACTED."""
    text = _ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}{MARKER}", text)
    return _JWT.sub(MARKER, text)


class RedactTokens(logging.Filter):
    """Rewrites a record's message, exception text and stack so no token remains.

    A handler filter, not a logger filter: records from child loggers (such as
    `websockets.server`) reach the root's handlers without passing the
    root logger's own filters.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in record_fields(record).items():
            if isinstance(value, str):
                clean = redact(value)
                if clean != value:
                    setattr(record, key, clean)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of `logger` (default: the root), once each."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactTokens) for f in handler.filters):
            handler.addFilter(RedactTokens())


def unreachable() -> tuple[type[BaseException], ...]:
    """What a client raises when its Redis (a server, or every seed node of a cluster:
    redis_contract/target.py) cannot be reached; a CLI says so in one line. A function,
    so that `oddsgate status` and the like, which import this module, never load redis."""
    import redis.exceptions

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.RedisClusterException, OSError)


def shown_url(url: str) -> str:
    """A Redis URL with its password (`user:pw@` or `?password=`) replaced, for an
    error line; a cluster's `redis-cluster://host:port,...` holds none."""
    parts = urlsplit(url)
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    try:
        password = parts.password
    except ValueError:  # a netloc urlsplit cannot read: show only the scheme
        return f"{parts.scheme}://..."
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    # spliced into the URL as given (urlunsplit would turn unix:///path into unix:/path)
    shown = url.replace(parts.netloc, netloc, 1) if netloc != parts.netloc else url
    if query != parts.query:
        shown = shown.replace(f"?{parts.query}", f"?{query}", 1)
    return shown
