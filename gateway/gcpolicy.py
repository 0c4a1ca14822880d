"""When the worker runs CPython's full garbage collection, instead of whenever it likes.

A full collection walks every tracked object in the process, and a worker's
heap is mostly long-lived player state: some 75 tracked objects per
connection (websockets' protocol, reader, futures, our session). At 4,000
players the automatic full collections measured 100-430 ms each on the
bench machine, and CPython runs one every time the long-lived heap grows by
a quarter, so a worker filling up before kick-off stalls again and again:
no price leaves it and no snapshot is served while the collector walks.

Reference counting frees almost everything a worker drops; what only a
full collection can free is reference cycles that died after they were
promoted to the oldest generation, and in this worker those come from
connections that closed (their tasks, futures and exceptions hold each
other). So the policy is:

- at start, collect once and `gc.freeze()` what the imports and settings
  built (it never dies; later collections skip it);
- keep the young collections (generations 0 and 1) as they are: they are
  cheap and catch the cycles a request or a turn leaves behind;
- turn the automatic full collection off, and run it here when garbage can
  have piled up: after `closed_share` of the open connections (and at least
  `min_closed`) have closed since the last one, or `interval_s` after it in
  any case. A steady or growing crowd then sees no full pause at all; churn
  pays one pause per quarter of the crowd replaced, as it did before, and
  memory stays bounded.

Every full collection is timed; the count and the total pause go to the
fleet table and `/metrics`, so an SRE sees what the policy costs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("oddsgate.gc")

# A generation-2 threshold that is never reached: CPython counts generation-1
# collections against it, one per ten generation-0 collections.
NEVER = 2**31 - 1


class GcPolicy:
    """Owns the process's garbage-collector settings while installed."""

    def __init__(self, *, closed_share: float = 0.25, min_closed: int = 1000,
                 interval_s: float = 900.0, check_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 collect: Callable[[], int] = gc.collect) -> None:
        self.closed_share = closed_share
        self.min_closed = min_closed
        self.interval_s = interval_s
        self.check_s = check_s
        self._clock = clock
        self._collect = collect
        self.closed = 0  # connections closed since the last full collection
        self.collections = 0  # full collections run by the policy
        self.pause_ns_total = 0
        self.last_pause_ns = 0
        self.installed = False
        self._last = clock()
        self._saved: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Freeze the start-up heap and take full collections over from CPython."""
        if self.installed:
            return
        self._saved = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gen0, gen1, _ = self._saved
        gc.set_threshold(gen0, gen1, NEVER)
        self.installed = True
        self._last = self._clock()
        log.info("garbage collection: start-up heap frozen (%d objects); full collections "
                 "after %.0f%% of the players (at least %d) closed, or every %.0f s",
                 gc.get_freeze_count(), 100 * self.closed_share, self.min_closed,
                 self.interval_s)

    def uninstall(self) -> None:
        """CPython's own policy again (a worker run inside a test process)."""
        if not self.installed:
            return
        assert self._saved is not None
        gc.set_threshold(*self._saved)
        gc.unfreeze()
        self.installed = False

    def connection_closed(self) -> None:
        self.closed += 1

    def due(self, open_connections: int, now: float | None = None) -> str | None:
        """Why a full collection is due now, or None."""
        if self.closed >= max(self.min_closed, self.closed_share * open_connections):
            return f"{self.closed} connections closed"
        now = self._clock() if now is None else now
        if now - self._last >= self.interval_s:
            return f"{now - self._last:.0f} s since the last"
        return None

    def collect(self, reason: str) -> int:
        """One full collection, timed; the number of unreachable objects it found."""
        started = time.perf_counter_ns()
        found = self._collect()
        pause = time.perf_counter_ns() - started
        self.collections += 1
        self.pause_ns_total += pause
        self.last_pause_ns = pause
        self.closed = 0
        self._last = self._clock()
        log.info("full garbage collection (%s): %d unreachable objects, %.1f ms",
                 reason, found, pause / 1e6)
        return found

    async def run(self, open_connections: Callable[[], int],
                  hold: Callable[[], bool] = lambda: False) -> None:
        """Check every `check_s`; collect when due. Only while installed, and not while
        `hold()` (a draining worker still sending its players away: a pause there
        delays their hints, and the garbage is better collected once they left)."""
        while True:
            await asyncio.sleep(self.check_s)
            if not self.installed or hold():
                continue
            try:
                reason = self.due(open_connections())
                if reason is not None:
                    self.collect(reason)
            except Exception:  # the policy must never take the worker down
                log.exception("garbage collection check failed")
