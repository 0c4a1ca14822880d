"""Every refusal the gateway makes and every close it decides: the one map to the wire.

A request the gateway refuses becomes an `error` frame with a PROTOCOL.md §4
code; some refusals also end the connection with a close code (§4's table).
Handlers raise `ProtocolError`; the session turns it into frames and, where
`close_code` is set, a close. Internal failures never reach a player as
details: they close 1011 and the cause goes to the log. A connection the
worker ends on its own (a dead peer, a stalled one, a flood, an expired
token, a drain) is closed with its `Ending`'s code and reason.
"""

from __future__ import annotations

from enum import Enum, IntEnum, StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_TOPIC = "unknown_topic"
    FORBIDDEN = "forbidden"
    TOO_MANY_TOPICS = "too_many_topics"
    RATE_LIMITED = "rate_limited"
    SHED = "shed"


class CloseCode(IntEnum):
    NORMAL = 1000
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTART = 1012  # drain or restart: reconnect and resume
    TRY_LATER = 1013  # overload
    REPEATED_BAD_REQUESTS = 4400
    UNAUTHORIZED = 4401
    RATE_LIMITED = 4429


class Ending(Enum):
    """Why the worker itself ends a connection: its close code and the reason shown."""

    HEARTBEAT_TIMEOUT = (CloseCode.INTERNAL, "keepalive ping timeout")
    TOO_SLOW = (CloseCode.TRY_LATER, "too slow: output buffer full")
    CONTROL_FLOOD = (CloseCode.RATE_LIMITED, "too many control frames")
    TOKEN_EXPIRED = (CloseCode.UNAUTHORIZED, "token expired")
    DRAIN = (CloseCode.RESTART, "drain")  # after `reconnect`: resume on another worker
    RETIRE = (CloseCode.RESTART, "restart")  # this process is being replaced
    # The whole region is being drained (a deploy): resume in another region.
    REGION_DRAIN = (CloseCode.RESTART, "region_drain")
    SHUTDOWN = (CloseCode.RESTART, "server restarting")

    @property
    def code(self) -> CloseCode:
        return self.value[0]

    @property
    def reason(self) -> str:
        return self.value[1]


class ProtocolError(Exception):
    """A refused request: its error frame, and the close it forces, if any."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: object = None,
        topics: list[str] | None = None,
        retry_after_ms: int | None = None,
        close_code: CloseCode | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.topics = topics
        self.retry_after_ms = retry_after_ms
        self.close_code = close_code


def close_for_exception(exc: BaseException) -> tuple[CloseCode, str]:
    """The close code and the reason a player may see, for any failure.

    Only a ProtocolError's own message is shown; anything else is an internal
    error whose details stay in the log.
    """
    if isinstance(exc, ProtocolError) and exc.close_code is not None:
        # A close reason must fit a control frame: 123 bytes of UTF-8 (RFC 6455 §5.5).
        return exc.close_code, exc.message.encode()[:123].decode("utf-8", "ignore")
    return CloseCode.INTERNAL, "internal error"
