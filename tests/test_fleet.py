"""The fleet table: layout, writers and readers, and real processes sharing it."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import time
import traceback
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest

from gateway.counters import STATS, WorkerCounters
from gateway.fleet import (
    HEADER_BYTES,
    HEADER_WORDS,
    LATENCY_BOUNDS_S,
    LATENCY_WORDS,
    LAYOUT_VERSION,
    SLOT_BYTES,
    SLOT_WORDS,
    SUMMED_FIELDS,
    WORD_BYTES,
    WORKER_WORDS,
    DrainCommand,
    FleetError,
    FleetTable,
    HeaderField,
    SlotView,
    SupervisorField,
    WorkerField,
    WorkerState,
)

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")


@pytest.fixture
def table():
    table = FleetTable.create(4)
    yield table
    table.close()
    if (SHM / table.name).exists():
        table.unlink()


# -- lifetime ---------------------------------------------------------------


def test_create_attach_close_unlink():
    table = FleetTable.create(3)
    assert table.slots == 3
    header = (SHM / table.name).read_bytes()[:HEADER_BYTES]
    words = struct.unpack(f"{HEADER_WORDS}q", header)
    assert words[HeaderField.SUPERVISOR_PID] == os.getpid()
    assert abs(words[HeaderField.CREATED_NS] - time.time_ns()) < 10e9
    assert (SHM / table.name).exists()

    other = FleetTable.attach(table.name)
    assert other.slots == 3
    table.worker_writer(2).publish({WorkerField.CONNECTIONS: 5})
    table.worker_writer(2).set_state(WorkerState.READY)
    assert other.read(2).connections == 5
    other.close()
    other.close()  # idempotent
    assert (SHM / table.name).exists()  # closing an attachment leaves the segment

    table.close()
    table.unlink()
    assert not (SHM / table.name).exists()
    with pytest.raises(FileNotFoundError):
        FleetTable.attach(table.name)


def test_context_manager_unlinks_in_the_creator_only():
    with FleetTable.create(1) as table:
        name = table.name
        with FleetTable.attach(name) as reader:
            assert reader.slots == 1
        assert (SHM / name).exists()
    assert not (SHM / name).exists()


def test_slot_index_is_checked(table):
    with pytest.raises(IndexError):
        table.read(4)
    with pytest.raises(IndexError):
        table.worker_writer(-1)
    with pytest.raises(ValueError):
        FleetTable.create(0)


# -- layout -------------------------------------------------------------------


def test_layout():
    for enum in (HeaderField, WorkerField, SupervisorField):
        values = [m.value for m in enum.__members__.values()]
        assert len(values) == len(set(values)), f"{enum.__name__} has aliases"
    assert max(HeaderField) < HEADER_WORDS
    assert HEADER_BYTES % 64 == 0 and SLOT_BYTES % 64 == 0  # whole cache lines

    worker_words = [f for f in WorkerField if f is not WorkerField.LATENCY_BUCKETS]
    worker_words += list(LATENCY_WORDS)
    assert len(worker_words) == len(set(worker_words)), "latency words overlap other fields"
    assert all(0 <= w < WORKER_WORDS for w in worker_words)
    supervisor_words = list(SupervisorField)
    assert all(WORKER_WORDS <= w < SLOT_WORDS for w in supervisor_words)
    assert not set(worker_words) & set(supervisor_words)

    for slot in range(3):
        for word in worker_words + supervisor_words:
            offset = HEADER_BYTES + slot * SLOT_BYTES + word * WORD_BYTES
            assert offset % WORD_BYTES == 0
            assert HEADER_BYTES + slot * SLOT_BYTES <= offset
            assert offset + WORD_BYTES <= HEADER_BYTES + (slot + 1) * SLOT_BYTES

    assert len(LATENCY_WORDS) == len(LATENCY_BOUNDS_S)
    assert LATENCY_WORDS.stop == WorkerField.LATENCY_SUM_NS
    assert list(LATENCY_BOUNDS_S) == sorted(LATENCY_BOUNDS_S)
    assert LATENCY_BOUNDS_S[-1] == float("inf")


def test_slot_view_names_every_field():
    names = {f.name for f in dataclasses.fields(SlotView)}
    assert {f.name.lower() for f in (*WorkerField, *SupervisorField)} <= names


def test_the_worker_part_is_derived_from_the_declaration():
    """gateway/counters.py's STATS: one word each, in row order, after the writer's own."""
    words = [int(WorkerField[stat.name.upper()]) for stat in STATS]
    first = WorkerField.LATENCY_COUNT + 1
    assert words == list(range(first, first + len(STATS)))
    assert {f.name for f in dataclasses.fields(WorkerCounters)} == {
        stat.name for stat in STATS if stat.counted}
    counters = WorkerCounters()
    counters.deliveries += 3  # the hot path: plain attributes, zero to start
    assert counters.deliveries == 3 and counters.events_in == 0
    with pytest.raises(AttributeError):
        counters.delivries = 1  # slots: a misspelt counter fails loudly
    summed = {f.name.lower() for f in SUMMED_FIELDS}
    assert summed == {"latency_sum_ns", "latency_count"} | {
        stat.name for stat in STATS if stat.summed}
    assert {"port", "pubsub_lag_ns"}.isdisjoint(summed)


def _raw_segment(words: dict[int, int], slots: int = 1) -> SharedMemory:
    shm = SharedMemory(create=True, size=HEADER_BYTES + slots * SLOT_BYTES)
    view = shm.buf.cast("q")
    header = {
        HeaderField.MAGIC: int.from_bytes(b"oddsgate", "little"),
        HeaderField.VERSION: LAYOUT_VERSION,
        HeaderField.HEADER_WORDS: HEADER_WORDS,
        HeaderField.SLOT_WORDS: SLOT_WORDS,
        HeaderField.SLOTS: slots,
    }
    for word, value in {**header, **words}.items():
        view[word] = value
    view.release()
    return shm


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ({HeaderField.MAGIC: 0x1234}, "bad magic"),
        ({HeaderField.VERSION: LAYOUT_VERSION + 1}, "layout version"),
        ({HeaderField.SLOT_WORDS: SLOT_WORDS + 8}, "slot words"),
        ({HeaderField.SLOTS: 2}, "do not fit"),
    ],
)
def test_unknown_segment_is_refused(words, message):
    shm = _raw_segment(words)
    try:
        with pytest.raises(FleetError, match=message):
            FleetTable.attach(shm.name)
        assert (SHM / shm.name).exists()  # refused, not removed
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.parametrize("name", ["", "/", "a/b", "../oddsgate"])
def test_attach_only_opens_a_segment_name(name):
    with pytest.raises(FleetError, match="segment name"):
        FleetTable.attach(name)


@pytest.mark.parametrize(("size", "message"), [(0, "too small"), (HEADER_BYTES - 8, "too small"),
                                               (HEADER_BYTES + SLOT_BYTES + 3, "size")])
def test_a_segment_of_the_wrong_size_is_refused(size, message):
    shm = SharedMemory(create=True, size=max(size, 1))
    os.truncate(SHM / shm.name, size)
    try:
        with pytest.raises(FleetError, match=message):
            FleetTable.attach(shm.name)
    finally:
        shm.close()
        shm.unlink()


def test_attach_takes_the_name_with_or_without_its_slash(table):
    table.worker_writer(1).publish({WorkerField.CONNECTIONS: 3})
    with FleetTable.attach("/" + table.name) as other:
        assert other.name == table.name and other.read(1).connections == 3


def test_a_well_formed_raw_segment_is_accepted():
    shm = _raw_segment({})
    try:
        with FleetTable.attach(shm.name) as table:
            assert table.slots == 1
    finally:
        shm.close()
        shm.unlink()


# -- writers and readers --------------------------------------------------------


def test_round_trip(table):
    writer = table.worker_writer(1)
    writer.claim()
    view = table.read(1)
    assert view.pid == os.getpid() and view.state is WorkerState.STARTING
    assert view.started_ns == view.heartbeat_ns > 0

    fields = [f for f in WorkerField if f not in (
        WorkerField.LATENCY_BUCKETS, WorkerField.STATE, WorkerField.HEARTBEAT_NS)]
    writer.publish({f: 1000 + f for f in fields})
    writer.set_state(WorkerState.READY)
    view = table.read(1)
    for f in fields:
        assert getattr(view, f.name.lower()) == 1000 + f, f
    assert view.state is WorkerState.READY
    assert 0 <= view.heartbeat_age_s() < 5
    assert view.heartbeat_age_s(view.heartbeat_ns + 2_500_000_000) == 2.5
    assert table.read(0).heartbeat_age_s() == float("inf")
    assert not table.read(0).occupied and view.occupied

    with pytest.raises(ValueError):
        writer.publish({SupervisorField.DRAIN: 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        writer.publish({WorkerField.LATENCY_BUCKETS: 1})  # observe_latency_ns keeps them


def test_supervisor_commands(table):
    supervisor = table.supervisor_writer(2)
    worker = table.worker_writer(2)
    assert worker.drain_command().seq == 0 and not worker.drain_command().drain

    assert supervisor.request_drain(30_000) == 1
    command = worker.drain_command()
    assert command == DrainCommand(drain=True, window_ms=30_000, settle_ms=0, retire=False,
                                   seq=1)
    assert table.read(2).drain and table.read(2).drain_window_ms == 30_000
    assert supervisor.request_drain(500, 600, retire=True) == 2
    assert worker.drain_command() == DrainCommand(True, 500, 600, True, 2)
    assert supervisor.cancel_drain() == 3
    command = worker.drain_command()
    assert not command.drain and not command.retire and table.read(2).drain_seq == 3
    assert supervisor.count_restart() == 1 and supervisor.count_restart() == 2
    assert table.read(2).restarts == 2

    view = table.read(2)
    assert (view.drain, view.drain_window_ms, view.drain_settle_ms, view.drain_retire,
            view.drain_seq, view.restarts) == (False, 500, 600, False, 3, 2)
    with pytest.raises(ValueError):
        supervisor.request_drain(-1)


def test_reset_slot_readies_it_for_a_new_process(table):
    worker = table.worker_writer(1)
    worker.claim()
    worker.publish({WorkerField.CONNECTIONS: 9})
    supervisor = table.supervisor_writer(1)
    supervisor.request_drain(100, retire=True)
    supervisor.count_restart()

    table.reset_slot(1)
    view = table.read(1)
    assert view.state is WorkerState.EMPTY and view.connections == 0 and view.pid == 0
    assert not view.drain and not view.drain_retire and view.restarts == 1
    assert view.drain_seq == 2  # a withdrawal is a new command


def test_reset_zeroes_the_worker_part_only(table):
    worker = table.worker_writer(0)
    worker.claim()
    worker.publish({WorkerField.CONNECTIONS: 9, WorkerField.EVENTS_IN: 99})
    worker.observe_latency_ns(1)
    table.supervisor_writer(0).request_drain(100)
    table.supervisor_writer(0).count_restart()
    table.worker_writer(1).claim()

    worker.reset()
    view = table.read(0)
    assert view.state is WorkerState.EMPTY and view.pid == 0
    assert view.connections == view.events_in == view.latency_count == 0
    assert sum(view.latency_buckets) == 0
    assert view.drain and view.drain_window_ms == 100 and view.restarts == 1
    assert table.read(1).state is WorkerState.STARTING


def _expected_bucket(ns: int) -> int:
    return next(i for i, bound in enumerate(LATENCY_BOUNDS_S) if ns <= bound * 1e9)


@pytest.mark.parametrize(
    ("ns", "bucket"),
    [
        (0, 0),
        (-5, 0),
        (500_000, 0),  # le is inclusive
        (500_001, 1),
        (1_000_000, 1),
        (2_500_000, 2),
        (10_000_001, 5),
        (999_999_999, 10),
        (1_000_000_000, 10),
        (1_000_000_001, 11),  # +Inf
        (3600 * 10**9, 11),
    ],
)
def test_latency_buckets(table, ns, bucket):
    worker = table.worker_writer(0)
    worker.observe_latency_ns(ns)
    view = table.read(0)
    expected = [0] * len(LATENCY_BOUNDS_S)
    expected[bucket] = 1
    assert list(view.latency_buckets) == expected
    assert view.latency_sum_ns == max(ns, 0) and view.latency_count == 1
    if ns >= 0:
        assert _expected_bucket(ns) == bucket


def test_totals_and_backpressure_share(table):
    assert table.backpressure_share() == 0.0
    assert table.totals()["workers"] == 0
    for index, (connections, backpressure) in enumerate([(100, 3), (300, 17), (50, 50)]):
        worker = table.worker_writer(index)
        worker.claim()
        worker.publish({
            WorkerField.CONNECTIONS: connections,
            WorkerField.CONNECTIONS_BACKPRESSURE: backpressure,
            WorkerField.EVENTS_IN: 10 * (index + 1),
            WorkerField.PORT: 8000 + index,
        })
        worker.observe_latency_ns(1000 * (index + 1))
    table.worker_writer(2).set_state(WorkerState.EMPTY)  # gone: not counted
    totals = table.totals()
    assert set(totals) == {f.name.lower() for f in SUMMED_FIELDS} | {"workers"}
    assert totals["workers"] == 2
    assert totals["connections"] == 400 and totals["connections_backpressure"] == 20
    assert totals["events_in"] == 30
    assert totals["latency_count"] == 2 and totals["latency_sum_ns"] == 3000
    assert "port" not in totals and "pid" not in totals
    assert table.backpressure_share() == pytest.approx(0.05)


def test_the_breaker_decision_is_in_the_header_for_every_reader(table):
    other = FleetTable.attach(table.name)
    try:
        assert not other.breaker_open() and other.breaker_trips() == 0
        table.publish_breaker(True, 2)
        assert other.breaker_open() and other.breaker_trips() == 2
        table.publish_breaker(False, 2)
        assert not other.breaker_open() and other.breaker_trips() == 2
        assert all(v.state is WorkerState.EMPTY and v.connections == 0
                   for v in other.read_all())  # no slot word touched
    finally:
        other.close()


# -- processes ----------------------------------------------------------------------

ROUNDS = 50_000
COUNTERS = ("events_in", "deliveries", "bytes_out", "latency_count", "latency_sum_ns")


def _write_in_a_loop(table: FleetTable, index: int) -> None:
    worker = table.worker_writer(index)
    worker.claim()
    worker.set_state(WorkerState.READY)
    for i in range(1, ROUNDS + 1):
        worker.publish({
            WorkerField.CONNECTIONS: 10,
            WorkerField.CONNECTIONS_BACKPRESSURE: 1 if index == 0 else 0,
            WorkerField.EVENTS_IN: i,
            WorkerField.DELIVERIES: 3 * i,
            WorkerField.BYTES_OUT: 100 * i,
        })
        worker.observe_latency_ns(i * 1000)


def _fork_writers(table: FleetTable) -> list[int]:
    pids = []
    for index in range(2):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _write_in_a_loop(table, index)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    return pids


def fork_scenario() -> str:
    """Two forked workers write; a reader attached in the creator sums meanwhile.

    Returns the segment's name, already unlinked. Also run in a fresh
    interpreter to see what the resource tracker says at exit.
    """
    table = FleetTable.create(2)
    reader = FleetTable.attach(table.name)  # a tool in the creating process
    final = {
        "events_in": 2 * ROUNDS,
        "deliveries": 6 * ROUNDS,
        "bytes_out": 200 * ROUNDS,
        "latency_count": 2 * ROUNDS,
        "latency_sum_ns": 2 * 1000 * ROUNDS * (ROUNDS + 1) // 2,
    }
    pids = _fork_writers(table)
    running = set(pids)
    try:
        previous = reader.totals()
        midway = 0
        while running:
            now = reader.totals()
            for key in COUNTERS:
                assert previous[key] <= now[key] <= final[key], key
            assert reader.backpressure_share() in (0.0, 0.05, 0.1)
            midway += 0 < now["events_in"] < final["events_in"]
            previous = now
            for pid in list(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    running.discard(pid)
                    assert os.waitstatus_to_exitcode(status) == 0
        assert midway > 0, "never read while the writers ran"

        totals = reader.totals()
        assert {key: totals[key] for key in COUNTERS} == final
        assert totals["workers"] == 2 and totals["connections"] == 20
        buckets = [0] * len(LATENCY_BOUNDS_S)
        for i in range(1, ROUNDS + 1):
            buckets[_expected_bucket(i * 1000)] += 2
        views = reader.read_all()
        assert [a + b for a, b in zip(*(v.latency_buckets for v in views), strict=True)] \
            == buckets
        assert {v.pid for v in views} == set(pids)
    finally:
        for pid in running:
            os.waitpid(pid, 0)
        reader.close()
        table.close()
        table.unlink()
    return table.name


def test_forked_workers_and_a_reader():
    name = fork_scenario()
    assert not (SHM / name).exists()


def test_no_resource_tracker_noise_and_no_leak():
    """In a fresh interpreter, so the tracker's exit report is ours to read."""
    script = "from tests.test_fleet import fork_scenario; print(fork_scenario())"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert not (SHM / proc.stdout.strip()).exists()


def test_attach_from_another_process_leaves_the_segment(table):
    script = (
        "import sys\n"
        "from gateway.fleet import FleetTable, WorkerField, WorkerState\n"
        "table = FleetTable.attach(sys.argv[1])\n"
        "writer = table.worker_writer(3)\n"
        "writer.claim()\n"
        "writer.publish({WorkerField.CONNECTIONS: 7})\n"
        "writer.set_state(WorkerState.READY)\n"
        "print(table.read(0).connections)\n"
        "table.close()\n"
    )
    table.worker_writer(0).publish({WorkerField.CONNECTIONS: 41})
    proc = subprocess.run([sys.executable, "-c", script, table.name], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "leaked shared_memory" from its tracker
    assert proc.stdout.strip() == "41"
    assert (SHM / table.name).exists()
    view = table.read(3)
    assert view.connections == 7 and view.state is WorkerState.READY
    assert view.pid not in (0, os.getpid())


def test_a_forked_child_cannot_unlink(table):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                table.unlink()
            except FleetError:
                table.__exit__(None, None, None)  # leaving a `with` must not unlink either
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (SHM / table.name).exists()
    assert table.read(0).state is WorkerState.EMPTY  # still mapped and readable here
