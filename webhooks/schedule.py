"""What an attempt's result means: delivered, retry when, disable, or give up.

Delivery is at least once (PROTOCOL.md section 11): any 2xx is success;
anything else, a timeout or a refused connection is retried. The delay
doubles from `base_s` up to `cap_s`, each drawn from [half, all] of its
value ("equal jitter"), so endpoints that failed together do not all come
back in the same second, and the first retry is within `base_s`. A server
that says when to come back (`Retry-After` on 429 and 503) is believed,
even beyond `cap_s` (one asking for more than the retry period left makes
a dead letter, kept for replay). Retries go on until `give_up_after_s` have passed since the
first attempt (24 h by default, as the senders partners compare us with
do), then the delivery becomes a dead letter. 410 Gone is the receiver
saying the endpoint no longer exists: it is disabled, never retried.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    GONE = "gone"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    due_s: float | None = None  # RETRY: when the next attempt is due (Unix s)


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_s)


@dataclass
class RetryPolicy:
    base_s: float = 2.0
    cap_s: float = 3600.0
    give_up_after_s: float = 90000.0
    rng: random.Random | None = None

    def delay_s(self, failures: int) -> float:
        """The wait after the `failures`-th failed attempt (1 for the first)."""
        full = min(self.cap_s, self.base_s * 2 ** max(0, failures - 1))
        rng = self.rng or random
        return full / 2 + rng.random() * full / 2

    def decide(self, status: int | None, retry_after: str | None, failures_before: int,
               first_attempt_s: float, now_s: float) -> Decision:
        """The verdict on one attempt: `status` None for a timeout or a connection error."""
        if status is not None and 200 <= status < 300:
            return Decision(Verdict.DELIVERED)
        if status == 410:
            return Decision(Verdict.GONE)
        failures = failures_before + 1
        delay = self.delay_s(failures)
        if status in (429, 503):
            asked = parse_retry_after(retry_after, now_s)
            if asked is not None:
                delay = max(delay, asked)
        due = now_s + delay
        if due - first_attempt_s > self.give_up_after_s:
            return Decision(Verdict.DEAD)
        return Decision(Verdict.RETRY, due)


def rfc3339(ts_s: float) -> str:
    """An event's `timestamp`: RFC 3339, UTC, milliseconds."""
    return datetime.fromtimestamp(ts_s, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
