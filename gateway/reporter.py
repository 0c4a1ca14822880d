"""A worker's link to its supervisor: counters out, drain orders in.

Every interval the worker copies its totals into its own slot of the fleet
table (the heartbeat comes with them, so a stuck event loop shows as a stale
heartbeat) and reads the supervisor's drain order for the slot. Nothing on
the hot path touches shared memory except the fan-out latency histogram,
observed once per event per turn.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.fleet import FleetTable, WorkerField, WorkerSlotWriter, WorkerState

if TYPE_CHECKING:
    from gateway.server import Worker

log = logging.getLogger("oddsgate.reporter")

F = WorkerField


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
        if table is not None:  # the breaker follows the whole node, not this worker
            worker.backpressure = table.backpressure_counts

    def start(self) -> None:
        self.writer.claim()
        self.writer.set(F.PORT, self.worker.settings.port)
        self.worker.hub.latency_sink = self.writer.observe_latency_ns

    def state(self) -> WorkerState:
        if self.worker.stopping:
            return WorkerState.STOPPING
        if self.worker.draining:
            return WorkerState.DRAINING
        return WorkerState.READY if self.worker.started else WorkerState.STARTING

    def publish(self) -> None:
        worker = self.worker
        c = worker.counters
        connections = worker.connections
        self.writer.publish({
            F.CONNECTIONS: len(connections),
            F.CONNECTIONS_BACKPRESSURE: worker.connections_in_backpressure(),
            F.SUBSCRIPTIONS: sum(len(s.cursors) for s in connections),
            F.TOPICS: len(worker.hub.channels),
            F.EVENTS_IN: c.events_in,
            F.DELIVERIES: c.deliveries,
            F.FRAMES_OUT: c.frames_out,
            F.BYTES_OUT: c.bytes_out,
            F.COALESCED: c.coalesced,
            F.SHED: c.shed,
            F.RESUMES_REPLAYED: c.resumes_replayed,
            F.RESUMES_RESET: c.resumes_reset,
            F.SNAPSHOTS: c.snapshots,
            F.GAPS_FILLED: c.gaps_filled,
            F.CHANNEL_RESETS: c.channel_resets,
            F.REDIS_RECONNECTS: worker.broker.reconnects,
            F.REDIS_CONNECTED: int(worker.broker.connected.is_set()),
            F.CONNECTIONS_ACCEPTED: c.connections_accepted,
            F.PUBSUB_LAG_NS: worker.hub.pubsub_lag_ns,
            F.BREAKER_OPEN: int(worker.breaker.open),
            F.BREAKER_TRIPS: worker.breaker.trips,
            F.GC_FULL_COLLECTIONS: worker.gc.collections,
            F.GC_FULL_PAUSE_NS: worker.gc.pause_ns_total,
        })
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
                                    reason="restart" if order.retire else "drain")
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

