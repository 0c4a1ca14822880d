"""A worker's link to its supervisor: counters out; drain orders and the breaker in.

Every interval the worker copies every row of gateway/counters.py's `STATS`
into its own slot of the fleet table (the heartbeat comes with them, so a
stuck event loop shows as a stale heartbeat) and reads the supervisor's drain
order for the slot. The only shared memory on the hot path: the fan-out
latency histogram, observed once per event per turn, and the node's breaker
word, read once per subscribe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.counters import STATS
from gateway.fleet import FleetTable, WorkerField, WorkerSlotWriter, WorkerState

if TYPE_CHECKING:
    from gateway.server import Worker

log = logging.getLogger("oddsgate.reporter")

# (slot word, how to read it from the worker) for every row of gateway/counters.py.
_READS = tuple((WorkerField[stat.name.upper()], stat.read) for stat in STATS)


class FleetReporter:
    def __init__(self, worker: Worker, writer: WorkerSlotWriter, interval_s: float = 0.05,
                 table: FleetTable | None = None):
        self.worker = worker
        self.writer = writer
        self.interval_s = interval_s
        # The supervisor clears the slot's order before starting a process, so
        # whatever order stands when this process first looks is meant for it.
        self._drain_seq = -1
        self._retiring = False
        if table is not None:
            # Under a supervisor the node's breaker is decided once, by the supervisor,
            # on every worker's players; this worker sheds when the table says so, and
            # its own breaker (a lone worker's) stands down.
            worker.breaker = None
            worker.breaker_open = table.breaker_open

    def start(self) -> None:
        self.writer.claim()
        self.worker.hub.latency_sink = self.writer.observe_latency_ns

    def state(self) -> WorkerState:
        if self.worker.stopping:
            return WorkerState.STOPPING
        if self.worker.draining:
            return WorkerState.DRAINING
        return WorkerState.READY if self.worker.started else WorkerState.STARTING

    def publish(self) -> None:
        worker = self.worker
        self.writer.publish({field: read(worker) for field, read in _READS})
        self.writer.set_state(self.state())

    def follow_orders(self) -> None:
        order = self.writer.drain_command()
        if order.seq == self._drain_seq:
            return
        self._drain_seq = order.seq
        if order.drain:
            self._retiring = order.retire
            self.worker.begin_drain(order.window_ms, order.settle_ms,
                                    stop_listening=order.retire,
                                    reason="restart" if order.retire
                                    else "region_drain" if order.region else "drain")
        elif self.worker.draining and not self._retiring:
            self.worker.end_drain()

    async def run(self) -> None:
        while True:
            try:
                self.follow_orders()
                self.publish()
            except Exception:  # reporting must never take the worker down
                log.exception("fleet report failed")
            await asyncio.sleep(self.interval_s)

