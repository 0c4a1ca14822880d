"""The worker's running totals, in one object every part of the worker bumps.

Plain attributes, incremented on the hot path with no lock (one event loop
per process); the worker copies them into its fleet-table slot a few times
a second, so the supervisor, HAProxy's agent and /metrics read them without
asking the worker anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class WorkerCounters:
    events_in: int = 0  # events received from Redis on channels this worker serves
    deliveries: int = 0  # events handed to players (one per player per event)
    frames_out: int = 0
    bytes_out: int = 0
    coalesced: int = 0
    shed: int = 0
    gaps_filled: int = 0
    channel_resets: int = 0
    resumes_replayed: int = 0
    resumes_reset: int = 0
    snapshots: int = 0
    connections_accepted: int = 0
