"""The fleet table: one shared-memory segment per node, one slot per worker.

The supervisor creates the segment before it starts the workers. A forked
worker uses the `FleetTable` object (and mapping) it inherited; a worker
started with exec attaches by name (`FleetTable.attach` maps the segment's
file under /dev/shm and never touches the resource tracker). Each worker
writes its counters into its own slot; the supervisor writes its commands
into a separate part of each slot, and the node's breaker decision into the
header. Agent checks, `oddsgate status`, every worker's admission of
subscriptions and /metrics read it. Nobody locks.

Layout (version 2). Every word is an 8-byte signed integer at an 8-byte
aligned offset, read and written through `memoryview.cast("q")`:

    header   HEADER_WORDS words (`HeaderField`), 128 bytes
    slot i   SLOT_WORDS words at HEADER_BYTES + i * SLOT_BYTES, 640 bytes:
               words  0..63  the worker part (`WorkerField`), written only by
                             the worker that owns the slot
               words 64..79  the supervisor part (`SupervisorField`), written
                             only by the supervisor

The worker part is generated: the slot writer's own words (identity, state,
heartbeat, the fan-out latency histogram), then one word per row of
gateway/counters.py's `STATS`, in row order. A new row takes the next spare
word; bump `LAYOUT_VERSION` with it, so a worker of the new layout refuses a
supervisor's table of the old one rather than misreading it. Slots are whole
cache lines (the mapping is page aligned), so workers never share a line, and
the supervisor's part sits on its own lines.

Why no lock is needed. The one assumption: a store or load of one aligned
8-byte word is a single instruction, so a reader sees the old value or the new
one, never a torn mix. CPython's memoryview packs and unpacks a "q" item with
an 8-byte `memcpy`, which compilers emit as one `mov` on x86-64 (and one
`str`/`ldr` on arm64); aligned 8-byte accesses are atomic on both. Each word
has exactly one writer, so the read-modify-write of `+=` needs no lock either.
A reader may still see a slot mid-publish, some words from this publish and
some from the last; since counters only grow within a worker's life, a sum is
then at most one publish (100 ms) stale, which is fine for every reader here.
A worker that restarts starts its counters from zero again (Prometheus reads
that as a counter reset).
"""

from __future__ import annotations

import mmap
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, make_dataclass
from enum import IntEnum
from multiprocessing.shared_memory import SharedMemory
from types import TracebackType

from gateway.counters import STATS

MAGIC = int.from_bytes(b"oddsgate", "little")  # reads "oddsgate" in a hex dump
LAYOUT_VERSION = 2
WORD_BYTES = 8
HEADER_WORDS = 16
WORKER_WORDS = 64
SUPERVISOR_WORDS = 16
SLOT_WORDS = WORKER_WORDS + SUPERVISOR_WORDS
HEADER_BYTES = HEADER_WORDS * WORD_BYTES
SLOT_BYTES = SLOT_WORDS * WORD_BYTES
MAX_SLOTS = 4096

# Upper bounds (seconds, inclusive like Prometheus `le`) of the fan-out latency
# buckets; the last one catches everything. /metrics reuses these.
LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"),
)
_FINITE_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BOUNDS_S[:-1])


class FleetError(Exception):
    """A segment this code cannot read, or a table used the wrong way."""


class HeaderField(IntEnum):
    """Header words. The supervisor writes the identity words once in
    `FleetTable.create` and the breaker words on each of its ticks."""

    MAGIC = 0
    VERSION = 1
    HEADER_WORDS = 2
    SLOT_WORDS = 3
    SLOTS = 4
    CREATED_NS = 5  # time.time_ns() at creation
    SUPERVISOR_PID = 6
    BREAKER_OPEN = 7  # 0/1: the node sheds new subscriptions (supervisor/node.py decides)
    BREAKER_TRIPS = 8  # times the node's breaker opened
    # 9..15 reserved


_BREAKER_OPEN = int(HeaderField.BREAKER_OPEN)  # read on every subscribe: no enum lookup


class WorkerState(IntEnum):
    EMPTY = 0  # no worker in the slot; readers skip it
    STARTING = 1
    READY = 2
    DRAINING = 3
    STOPPING = 4


def _worker_words() -> list[tuple[str, int]]:
    """(name, word) of the worker part: the writer's own words, then STATS in order."""
    own = ["PID", "STARTED_NS", "HEARTBEAT_NS", "STATE"]
    words = [(name, i) for i, name in enumerate(own)]
    latency = len(own)  # one word per LATENCY_BOUNDS_S bucket, non-cumulative counts
    words += [("LATENCY_BUCKETS", latency),
              ("LATENCY_SUM_NS", latency + len(LATENCY_BOUNDS_S)),
              ("LATENCY_COUNT", latency + len(LATENCY_BOUNDS_S) + 1)]
    first = words[-1][1] + 1
    words += [(stat.name.upper(), first + i) for i, stat in enumerate(STATS)]
    if words[-1][1] >= WORKER_WORDS:
        raise FleetError(f"gateway/counters.py declares more than {WORKER_WORDS} words")
    return words


WorkerField = IntEnum("WorkerField", _worker_words(), module=__name__)
WorkerField.__doc__ = """Words of a slot's worker part. Written only by the worker owning the slot.

Values are word offsets inside the slot: PID, STARTED_NS (time.time_ns() when
the worker claimed the slot), HEARTBEAT_NS (of the last publish), STATE (a
WorkerState), the latency histogram (LATENCY_BUCKETS names the first of its
buckets), then one per row of gateway/counters.py's STATS.
"""


class SupervisorField(IntEnum):
    """Words of a slot's supervisor part. Written only by the supervisor.

    Values are word offsets inside the slot, after the worker part.
    """

    DRAIN = WORKER_WORDS + 0  # 0 or 1
    DRAIN_WINDOW_MS = WORKER_WORDS + 1  # spread players' reconnect.after_ms over this
    DRAIN_SEQ = WORKER_WORDS + 2  # +1 per drain or cancel command
    RESTARTS = WORKER_WORDS + 3  # times the supervisor replaced this slot's worker
    DRAIN_SETTLE_MS = WORKER_WORDS + 4  # wait this long (HAProxy sees the drain) before hints
    DRAIN_RETIRE = WORKER_WORDS + 5  # 0 or 1: the process is stopped after this drain
    DRAIN_REGION = WORKER_WORDS + 6  # 0 or 1: the whole region drains (hints say so)
    # up to SLOT_WORDS - 1 spare


LATENCY_WORDS = range(WorkerField.LATENCY_BUCKETS,
                      WorkerField.LATENCY_BUCKETS + len(LATENCY_BOUNDS_S))

# Summed by `FleetTable.totals`: the latency sum and count, and every row of STATS
# but identities and lags.
SUMMED_FIELDS: tuple[WorkerField, ...] = (
    WorkerField.LATENCY_SUM_NS, WorkerField.LATENCY_COUNT,
    *(WorkerField[stat.name.upper()] for stat in STATS if stat.summed),
)
# What a worker may write through `publish`: its own words but the histogram's
# buckets (`observe_latency_ns` keeps those).
_PUBLISHABLE = frozenset(WorkerField) - {WorkerField.LATENCY_BUCKETS}
_VIEW_WORDS = tuple((f.name.lower(), int(f)) for f in (*WorkerField, *SupervisorField))
_VIEW_TYPES = {"state": WorkerState, "latency_buckets": tuple[int, ...], "drain": bool,
               "drain_retire": bool, "drain_region": bool}


@dataclass(frozen=True, slots=True)
class DrainCommand:
    """The supervisor's current drain order for one slot."""

    drain: bool
    window_ms: int
    settle_ms: int
    retire: bool
    seq: int
    region: bool = False  # the region drains: players move to another region


class _SlotReading:
    """What a SlotView does besides holding its words."""

    __slots__ = ()

    @classmethod
    def from_words(cls, index: int, words: list[int]) -> SlotView:
        values: dict[str, object] = {name: words[i] for name, i in _VIEW_WORDS}
        values["state"] = WorkerState(words[WorkerField.STATE])
        values["latency_buckets"] = tuple(words[LATENCY_WORDS.start:LATENCY_WORDS.stop])
        values["drain"] = bool(words[SupervisorField.DRAIN])
        values["drain_retire"] = bool(words[SupervisorField.DRAIN_RETIRE])
        values["drain_region"] = bool(words[SupervisorField.DRAIN_REGION])
        return cls(index=index, **values)  # type: ignore[call-arg]

    @property
    def occupied(self) -> bool:
        return self.state is not WorkerState.EMPTY  # type: ignore[attr-defined]

    def heartbeat_age_s(self, now_ns: int | None = None) -> float:
        """Seconds since the last publish; infinite when there never was one."""
        heartbeat_ns: int = self.heartbeat_ns  # type: ignore[attr-defined]
        if heartbeat_ns == 0:
            return float("inf")
        now = time.time_ns() if now_ns is None else now_ns
        return max(0, now - heartbeat_ns) / 1e9


# A copy of one slot, taken word by word without a lock (see the module): `index`,
# then one attribute per WorkerField and SupervisorField, lower-cased.
SlotView = make_dataclass(
    "SlotView",
    [("index", int), *((name, _VIEW_TYPES.get(name, int)) for name, _ in _VIEW_WORDS)],
    bases=(_SlotReading,),
    frozen=True,
    slots=True,
)
SlotView.__module__ = __name__


SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory: shm_open(name) is this file


class _MappedSegment:
    """A segment another process created, mapped from its file under /dev/shm.

    Why not `SharedMemory(name)`: on Python < 3.13 it registers the segment with
    this process's resource tracker, which unlinks it when this process exits
    and so destroys the supervisor's live table; avoiding that took swapping
    the tracker's `register` out under a lock. Mapping the file is what
    shm_open does on Linux, minus the tracker, on every Python version. The
    creator keeps `SharedMemory`: its tracker unlinking the segment should the
    supervisor die without `unlink()` is wanted.
    """

    def __init__(self, name: str) -> None:
        name = name.removeprefix("/")
        if not name or "/" in name:
            raise FleetError(f"{name!r} is not a shared memory segment name")
        self.name = name
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            if self.size < HEADER_BYTES:
                raise FleetError(f"segment {name} is too small for a fleet table")
            self._mapping = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mapping)

    def close(self) -> None:
        self.buf.release()
        self._mapping.close()


class FleetTable:
    """The node's fleet table; see the module docstring for layout and rules."""

    def __init__(self, shm: SharedMemory | _MappedSegment, *, created_here: bool) -> None:
        self._shm = shm
        try:
            self._words = shm.buf.cast("q")
        except TypeError:  # not a whole number of words
            shm.close()
            raise FleetError(f"segment {shm.name} is not a fleet table (size)") from None
        self._creator_pid = os.getpid() if created_here else None
        self._closed = False
        words = self._words
        if len(words) < HEADER_WORDS:
            self._release()
            raise FleetError(f"segment {shm.name} is too small for a fleet table")
        if words[HeaderField.MAGIC] != MAGIC:
            self._release()
            raise FleetError(f"segment {shm.name} is not a fleet table (bad magic)")
        problems = [
            f"{what} {words[field]}, expected {expected}"
            for field, expected, what in (
                (HeaderField.VERSION, LAYOUT_VERSION, "layout version"),
                (HeaderField.HEADER_WORDS, HEADER_WORDS, "header words"),
                (HeaderField.SLOT_WORDS, SLOT_WORDS, "slot words"),
            )
            if words[field] != expected
        ]
        slots = words[HeaderField.SLOTS]
        if not 0 < slots <= MAX_SLOTS or HEADER_WORDS + slots * SLOT_WORDS > len(words):
            problems.append(f"{slots} slots do not fit in {shm.size} bytes")
        if problems:
            self._release()
            raise FleetError(f"cannot read fleet table {shm.name}: " + "; ".join(problems))
        self._slots = slots

    # -- lifetime -----------------------------------------------------------

    @classmethod
    def create(cls, slots: int, *, name: str | None = None) -> FleetTable:
        """A new zeroed table; the supervisor calls this once, before any worker.

        The creating process's resource tracker unlinks the segment should the
        supervisor die without `unlink()` (workers keep their mapping).
        """
        if not 0 < slots <= MAX_SLOTS:
            raise ValueError(f"slots must be 1..{MAX_SLOTS}, not {slots}")
        shm = SharedMemory(name, create=True, size=HEADER_BYTES + slots * SLOT_BYTES)
        words = shm.buf.cast("q")
        words[HeaderField.VERSION] = LAYOUT_VERSION
        words[HeaderField.HEADER_WORDS] = HEADER_WORDS
        words[HeaderField.SLOT_WORDS] = SLOT_WORDS
        words[HeaderField.SLOTS] = slots
        words[HeaderField.CREATED_NS] = time.time_ns()
        words[HeaderField.SUPERVISOR_PID] = os.getpid()
        words[HeaderField.MAGIC] = MAGIC  # last: a complete header once it is there
        words.release()
        return cls(shm, created_here=True)

    @classmethod
    def attach(cls, name: str) -> FleetTable:
        """Open the table another process created, for tools and tests.

        Raises FileNotFoundError when there is no such segment and FleetError
        when it is not a table this code can read. The segment's file is mapped
        (`_MappedSegment`), never registered with a resource tracker, so
        closing or exiting leaves the supervisor's table in place, whatever
        process attaches: a tool, a test, or a worker the supervisor started
        with exec. A forked worker needs no attach: it uses the inherited table.
        """
        return cls(_MappedSegment(name), created_here=False)

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def slots(self) -> int:
        return self._slots

    def _release(self) -> None:
        self._words.release()  # before closing: the mapping refuses while views exist
        self._shm.close()
        self._closed = True

    def close(self) -> None:
        """Unmap the table in this process; the segment stays. Idempotent."""
        if not self._closed:
            self._release()

    def unlink(self) -> None:
        """Remove the segment from the system; the supervisor does it on exit.

        Only the creating process may: a forked worker unlinking would pull the
        table from under the whole node.
        """
        if self._creator_pid != os.getpid():
            raise FleetError("only the process that created the fleet table unlinks it")
        self._shm.unlink()
        self._creator_pid = None

    def __enter__(self) -> FleetTable:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close; the creating process (and no process forked from it) also unlinks."""
        if self._creator_pid == os.getpid():
            self.unlink()
        self.close()

    # -- writers --------------------------------------------------------------

    def _base(self, index: int) -> int:
        if not 0 <= index < self._slots:
            raise IndexError(f"slot {index} is not in 0..{self._slots - 1}")
        return HEADER_WORDS + index * SLOT_WORDS

    def worker_writer(self, index: int) -> WorkerSlotWriter:
        return WorkerSlotWriter(self._words, self._base(index), index)

    def supervisor_writer(self, index: int) -> SupervisorSlotWriter:
        return SupervisorSlotWriter(self._words, self._base(index), index)

    def reset_slot(self, index: int) -> None:
        """The supervisor readies a slot for a new process: worker part zeroed,
        drain order withdrawn, restart count kept.

        Only while no process runs in the slot (before the first start, or
        after reaping its last one): then the supervisor is the worker part's
        only writer.
        """
        self.worker_writer(index).reset()
        self.supervisor_writer(index).cancel_drain()

    # -- readers ----------------------------------------------------------------

    def _slot_words(self, index: int) -> list[int]:
        base = self._base(index)
        return self._words[base:base + SLOT_WORDS].tolist()  # word by word, in order

    def read(self, index: int) -> SlotView:
        return SlotView.from_words(index, self._slot_words(index))

    def read_all(self) -> list[SlotView]:
        return [self.read(i) for i in range(self._slots)]

    def _occupied_words(self) -> Iterator[list[int]]:
        for i in range(self._slots):
            words = self._slot_words(i)
            if words[WorkerField.STATE] != WorkerState.EMPTY:
                yield words

    def totals(self) -> dict[str, int]:
        """SUMMED_FIELDS by lower-case name over occupied slots, plus `workers`."""
        sums = dict.fromkeys((f.name.lower() for f in SUMMED_FIELDS), 0)
        sums["workers"] = 0
        for words in self._occupied_words():
            sums["workers"] += 1
            for field in SUMMED_FIELDS:
                sums[field.name.lower()] += words[field]
        return sums

    def backpressure_counts(self) -> tuple[int, int]:
        """(connections in back-pressure, all connections), node-wide."""
        connections = backpressure = 0
        for words in self._occupied_words():
            connections += words[WorkerField.CONNECTIONS]
            backpressure += words[WorkerField.CONNECTIONS_BACKPRESSURE]
        return backpressure, connections

    def backpressure_share(self) -> float:
        """Connections in back-pressure / all connections, node-wide (0.0 with none)."""
        backpressure, connections = self.backpressure_counts()
        return backpressure / connections if connections > 0 else 0.0

    # -- the node's breaker: the supervisor decides, every worker reads -------

    def publish_breaker(self, open_: bool, trips: int) -> None:
        """Write the node's breaker decision; only the supervisor calls this.

        Trips first: a reader that sees the breaker open sees its trip counted.
        """
        self._words[HeaderField.BREAKER_TRIPS] = trips
        self._words[_BREAKER_OPEN] = int(open_)

    def breaker_open(self) -> bool:
        """Whether the node sheds new subscriptions: one load, asked on every subscribe."""
        return self._words[_BREAKER_OPEN] != 0

    def breaker_trips(self) -> int:
        return self._words[HeaderField.BREAKER_TRIPS]


class WorkerSlotWriter:
    """The worker part of one slot.

    Only the process that owns that part may hold one: the worker running in
    the slot, or the supervisor clearing the slot once it reaped that worker.
    """

    __slots__ = ("_base", "_bucket0", "_count", "_sum", "_words", "index")

    def __init__(self, words: memoryview, base: int, index: int) -> None:
        self._words = words
        self._base = base
        self.index = index
        self._bucket0 = base + WorkerField.LATENCY_BUCKETS
        self._sum = base + WorkerField.LATENCY_SUM_NS
        self._count = base + WorkerField.LATENCY_COUNT

    def reset(self) -> None:
        """Zero the worker part (state first, so readers skip the slot at once)."""
        words, base = self._words, self._base
        words[base + WorkerField.STATE] = WorkerState.EMPTY
        for offset in range(WORKER_WORDS):
            words[base + offset] = 0

    def claim(self) -> None:
        """A fresh worker process takes the slot: zeroed, then pid, times, STARTING."""
        self.reset()
        now = time.time_ns()
        words, base = self._words, self._base
        words[base + WorkerField.PID] = os.getpid()
        words[base + WorkerField.STARTED_NS] = now
        words[base + WorkerField.HEARTBEAT_NS] = now
        words[base + WorkerField.STATE] = WorkerState.STARTING

    def publish(self, counters: Mapping[WorkerField, int]) -> None:
        """Write the given words, then the heartbeat; one store per word.

        Meant for every ~100 ms with all ~30 fields; costs a few microseconds.
        """
        words, base = self._words, self._base
        for field, value in counters.items():
            if field not in _PUBLISHABLE:
                raise ValueError(f"{field!r} is not a publishable worker field")
            words[base + field] = value
        words[base + WorkerField.HEARTBEAT_NS] = time.time_ns()

    def set_state(self, state: WorkerState) -> None:
        self._words[self._base + WorkerField.STATE] = WorkerState(state)

    def observe_latency_ns(self, ns: int) -> None:
        """Count one fan-out latency: its bucket (le, inclusive), then sum, then count."""
        if ns < 0:
            ns = 0
        words = self._words
        words[self._bucket0 + bisect_left(_FINITE_BOUNDS_NS, ns)] += 1
        words[self._sum] += ns
        words[self._count] += 1

    def drain_command(self) -> DrainCommand:
        """The supervisor's drain order, read consistently.

        The supervisor writes the window and the flag before bumping the seq;
        reading the seq before and after tells a torn read, which is retried.
        A worker acts whenever the seq differs from the last one it handled.
        """
        words, base = self._words, self._base
        while True:
            seq = words[base + SupervisorField.DRAIN_SEQ]
            drain = bool(words[base + SupervisorField.DRAIN])
            window_ms = words[base + SupervisorField.DRAIN_WINDOW_MS]
            settle_ms = words[base + SupervisorField.DRAIN_SETTLE_MS]
            retire = bool(words[base + SupervisorField.DRAIN_RETIRE])
            region = bool(words[base + SupervisorField.DRAIN_REGION])
            if words[base + SupervisorField.DRAIN_SEQ] == seq:
                return DrainCommand(drain, window_ms, settle_ms, retire, seq, region)


class SupervisorSlotWriter:
    """The supervisor part of one slot; only the supervisor holds one."""

    __slots__ = ("_base", "_words", "index")

    def __init__(self, words: memoryview, base: int, index: int) -> None:
        self._words = words
        self._base = base
        self.index = index

    def _get(self, field: SupervisorField) -> int:
        return self._words[self._base + field]

    def _put(self, field: SupervisorField, value: int) -> None:
        self._words[self._base + field] = value

    def request_drain(self, window_ms: int, settle_ms: int = 0, *, retire: bool = False,
                      region: bool = False) -> int:
        """Ask the worker to drain; returns the command's seq.

        The worker waits `settle_ms` (so HAProxy's agent check sees the drain
        first), then spreads its players' `reconnect.after_ms` over
        `window_ms`. `retire`: the supervisor stops this process after the
        drain (reload, shutdown) rather than possibly cancelling it. `region`:
        the whole region drains, and the players' hints say so (they move to
        another region, PROTOCOL.md §8).
        """
        if window_ms < 0 or settle_ms < 0:
            raise ValueError("window_ms and settle_ms must not be negative")
        self._put(SupervisorField.DRAIN_WINDOW_MS, window_ms)
        self._put(SupervisorField.DRAIN_SETTLE_MS, settle_ms)
        self._put(SupervisorField.DRAIN_RETIRE, int(retire))
        self._put(SupervisorField.DRAIN_REGION, int(region))
        self._put(SupervisorField.DRAIN, 1)
        return self._bump_seq()  # last: the worker sees a complete command

    def cancel_drain(self) -> int:
        """Withdraw a drain order; returns the command's seq."""
        self._put(SupervisorField.DRAIN, 0)
        self._put(SupervisorField.DRAIN_RETIRE, 0)
        self._put(SupervisorField.DRAIN_REGION, 0)
        return self._bump_seq()

    def _bump_seq(self) -> int:
        seq = self._get(SupervisorField.DRAIN_SEQ) + 1
        self._put(SupervisorField.DRAIN_SEQ, seq)
        return seq

    def count_restart(self) -> int:
        restarts = self._get(SupervisorField.RESTARTS) + 1
        self._put(SupervisorField.RESTARTS, restarts)
        return restarts
