"""The supervisor: one per node, owner of the worker processes and the fleet table.

It creates the fleet table, starts one worker per core, and keeps them
running: a worker that dies is restarted with exponential backoff (and left
failed after too many restarts in a window, rather than spinning); one whose
heartbeat stops is killed and replaced. It answers HAProxy's agent checks,
serves the control socket (status, drain, undrain, reload) and /metrics, and
on SIGTERM drains its players within a deadline before exiting 0.

It alone decides the node's back-pressure breaker: each tick it feeds the
table's node-wide counts to one Breaker and writes the decision into the
table's header, which every worker reads when it admits a subscription. One
decision, not one per worker: the copies could disagree for a tick, and status
and /metrics had to guess which to show.

Each worker index owns two slots of the fleet table, so a replacement can
report while its predecessor drains: a reload starts the successor on the
same port (SO_REUSEPORT), waits until it is ready, then retires the old one,
whose players reconnect to the same HAProxy server and land on the new
process. The node never refuses a player during a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from gateway.breaker import Breaker
from gateway.fleet import FleetTable, WorkerState
from haproxy.errors import HAProxyError
from supervisor.agent import AgentServer
from supervisor.control import ControlServer
from supervisor.haproxy import read_servers
from supervisor.sdnotify import Notifier
from supervisor.settings import NodeSettings

log = logging.getLogger("oddsgate.supervisor")

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
MONITOR_INTERVAL_S = 0.1


def about(index: int, pid: int | None = None) -> dict[str, int]:
    """A log line's fields naming the worker it is about (supervisor/logformat.py)."""
    return {"worker": index} if pid is None else {"worker": index, "worker_pid": pid}


class Phase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class Incarnation:
    """One process of a worker index, in one slot of the fleet table."""

    slot: int
    proc: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)
    retiring: bool = False  # being replaced (reload) or stopped: its exit is expected

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


@dataclass
class WorkerHandle:
    index: int
    port: int
    click_port: int  # its click listener's (gateway/clicklistener.py)
    current: Incarnation | None = None
    retired: list[Incarnation] = field(default_factory=list)
    phase: Phase = Phase.STARTING
    restart_times: list[float] = field(default_factory=list)  # within the crash-loop window
    restarts_total: int = 0  # every restart after an unplanned exit, for /metrics
    restart_at: float | None = None
    backoff_s: float = 0.0
    predecessor: Incarnation | None = None  # the process a reload is replacing
    operator_drain: bool = False
    region_drain: bool = False  # drained with its region: hints send players to another
    auto_drain: bool = False
    last_exit: str = ""

    def slots(self, workers: int) -> tuple[int, int]:
        return self.index, self.index + workers


class Supervisor:
    def __init__(self, settings: NodeSettings, worker_env: dict[str, str],
                 runtime_dir: Path, breaker: Breaker | None = None,
                 notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.worker_env = worker_env  # OG_* for every worker (Redis URL, secret, ...)
        self.runtime_dir = runtime_dir
        self.n = settings.worker_count
        self.table = FleetTable.create(2 * self.n)
        self.breaker = breaker or Breaker()  # the node's; see decide_breaker
        self.workers = [WorkerHandle(i, settings.base_port + i, settings.click_ports[i])
                        for i in range(self.n)]
        self.agent = AgentServer("127.0.0.1", settings.agent_port, self.agent_reply)
        self.control = ControlServer(runtime_dir / "control.sock", self.handle_command)
        self.stopping = False
        self.gave_up = False  # every worker failed: the node stops with exit code 1
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.extra_services: list = []  # started after the workers, stopped before them
        self.notifier = notifier or Notifier(None)  # systemd's Type=notify (sdnotify.py)
        self.announced_ready = False

    # -- lifecycle --------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        raise_fd_limit(self.n, self.settings.connections_per_worker)
        started: list = []  # services up, stopped here if the node fails before shutdown()
        try:
            await self.agent.start()
            await self.control.start()
            for worker in self.workers:
                await self._spawn(worker)
            for service in self.extra_services:
                await service.start()
                started.append(service)
            log.info("node up: %d workers on ports %d-%d, agent :%d, control %s", self.n,
                     self.settings.base_port, self.settings.base_port + self.n - 1,
                     self.settings.agent_port, self.control.path)
            monitor = asyncio.create_task(self._monitor())
            await self._stop.wait()
            await self.shutdown()
            monitor.cancel()
            return 1 if self.gave_up else 0
        finally:
            if not self.stopping:
                # A service that failed to start (HAProxy refusing its config, say) must
                # not leave the ones before it running, orphaned, after the node exits.
                for service in reversed(started):
                    with contextlib.suppress(Exception):
                        await service.stop()
            await self._kill_all()
            await self.control.stop()
            await self.agent.stop()
            self.table.close()
            self.table.unlink()

    async def shutdown(self) -> None:
        """SIGTERM: drain every player within the deadline, then stop the workers."""
        self.stopping = True
        deadline = time.monotonic() + self.settings.shutdown_deadline_s
        log.info("shutting down: draining %d connections", self.connections())
        self.notifier.send("STOPPING=1",
                           f"STATUS=draining {self.connections()} players before exit")
        for worker in self.workers:
            self._request_drain(worker, retire=True)
        while time.monotonic() < deadline and self.connections() > 0:
            await asyncio.sleep(0.05)
        for service in reversed(self.extra_services):
            with contextlib.suppress(Exception):
                await service.stop()
        await self._terminate_all()

    # -- processes --------------------------------------------------------

    def _free_slot(self, worker: WorkerHandle) -> int:
        busy = {inc.slot for inc in [worker.current, *worker.retired] if inc and inc.alive}
        return next(s for s in worker.slots(self.n) if s not in busy)

    async def _spawn(self, worker: WorkerHandle) -> Incarnation:
        slot = self._free_slot(worker)
        self.table.reset_slot(slot)  # clears its predecessor's words and drain order
        env = {
            **os.environ,
            **self.worker_env,
            "OG_PORT": str(worker.port),
            "OG_CLICK_PORT": str(worker.click_port),
            "OG_WORKER_INDEX": str(worker.index),
            "OG_FLEET": self.table.name,
            "OG_FLEET_SLOT": str(slot),
            "OG_REUSE_PORT": "1",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor.cli", "worker", env=env,
        )
        incarnation = Incarnation(slot, proc)
        worker.current = incarnation
        worker.phase = Phase.STARTING
        if worker.operator_drain:  # a drained worker's replacement is drained too
            self._request_drain(worker)
        log.info("worker %d started (pid %d, slot %d, port %d)", worker.index, proc.pid, slot,
                 worker.port, extra=about(worker.index, proc.pid))
        return incarnation

    def _view(self, incarnation: Incarnation | None):
        if incarnation is None:
            return None
        view = self.table.read(incarnation.slot)
        return view if view.pid == incarnation.pid else None

    def _is_ready(self, incarnation: Incarnation | None) -> bool:
        view = self._view(incarnation)
        return view is not None and view.state == WorkerState.READY

    async def _wait_ready(self, incarnation: Incarnation, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not incarnation.alive:
                return False
            if self._is_ready(incarnation):
                return True
            await asyncio.sleep(0.05)
        return False

    async def _terminate(self, incarnation: Incarnation, grace_s: float = STOP_GRACE_S) -> None:
        incarnation.retiring = True
        if not incarnation.alive:
            self._release(incarnation)
            return
        with contextlib.suppress(ProcessLookupError):
            incarnation.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(incarnation.proc.wait(), grace_s)
        except TimeoutError:
            log.warning("worker pid %d ignored SIGTERM for %.0fs; killing", incarnation.pid,
                        grace_s, extra={"worker_pid": incarnation.pid})
            with contextlib.suppress(ProcessLookupError):
                incarnation.proc.kill()
            await incarnation.proc.wait()
        self._release(incarnation)

    def _release(self, incarnation: Incarnation) -> None:
        """Clear the slot of a process that exited, once reaped.

        Its last words (state READY or STOPPING, a heartbeat that no longer
        moves, its players) would otherwise stay in the table until another
        process takes the slot: /metrics would show a dead worker whose
        heartbeat grows stale, and the node's counts would include it. Only
        while the slot still holds that pid: a successor may have claimed it.
        """
        if self._view(incarnation) is not None:
            self.table.worker_writer(incarnation.slot).reset()

    async def _terminate_all(self) -> None:
        incarnations = [inc for w in self.workers for inc in [w.current, *w.retired] if inc]
        await asyncio.gather(*(self._terminate(inc) for inc in incarnations))
        for worker in self.workers:
            worker.phase = Phase.STOPPED

    async def _kill_all(self) -> None:
        for worker in self.workers:
            for inc in [worker.current, *worker.retired]:
                if inc is not None and inc.alive:
                    with contextlib.suppress(ProcessLookupError):
                        inc.proc.kill()
                    await inc.proc.wait()

    # -- the monitor: exits, heartbeats, automatic drain ------------------

    async def _monitor(self) -> None:
        while True:
            try:
                self.decide_breaker()
                await self._check_workers()
                self._update_auto_drain()
                self._notify_systemd()
            except Exception:
                log.exception("monitor pass failed")
            await asyncio.sleep(MONITOR_INTERVAL_S)

    async def _check_workers(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            for inc in worker.retired:
                if not inc.alive:
                    self._release(inc)
            worker.retired = [inc for inc in worker.retired if inc.alive]
            inc = worker.current
            if worker.phase is Phase.FAILED or self.stopping:
                continue
            if inc is None:
                if worker.restart_at is not None and now >= worker.restart_at:
                    worker.restart_at = None
                    await self._spawn(worker)
                continue
            if not inc.alive:
                self._on_exit(worker, inc)
                continue
            view = self._view(inc)
            if view is None or view.state == WorkerState.STARTING:
                if now - inc.started > READY_TIMEOUT_S:
                    log.error("worker %d (pid %d) not ready after %.0fs; killing it",
                              worker.index, inc.pid, READY_TIMEOUT_S,
                              extra=about(worker.index, inc.pid))
                    inc.proc.kill()
                continue
            if worker.phase is Phase.STARTING and view.state == WorkerState.READY:
                worker.phase = Phase.DRAINING if worker.operator_drain else Phase.READY
                worker.backoff_s = 0.0
            if view.heartbeat_age_s(time.time_ns()) > self.settings.heartbeat_timeout_s:
                log.error("worker %d (pid %d) heartbeat stopped %.1fs ago; killing it",
                          worker.index, inc.pid, view.heartbeat_age_s(time.time_ns()),
                          extra=about(worker.index, inc.pid))
                inc.proc.kill()

    def _on_exit(self, worker: WorkerHandle, inc: Incarnation) -> None:
        code = inc.proc.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        worker.last_exit = how
        worker.current = None
        self._release(inc)
        now = time.monotonic()
        worker.restart_times = [t for t in worker.restart_times
                                if now - t < self.settings.crash_loop_window_s]
        if len(worker.restart_times) >= self.settings.crash_loop_restarts:
            worker.phase = Phase.FAILED
            log.error("worker %d died (%s) after %d restarts in %.0fs: crash loop, leaving it "
                      "failed (oddsgate reload tries again)", worker.index, how,
                      len(worker.restart_times), self.settings.crash_loop_window_s,
                      extra=about(worker.index, inc.pid))
            if all(w.phase is Phase.FAILED for w in self.workers):
                log.critical("every worker failed; stopping the node")
                self.gave_up = True
                self._stop.set()
            return
        worker.restart_times.append(now)
        worker.restarts_total += 1
        worker.backoff_s = min(self.settings.restart_backoff_max_s,
                               max(self.settings.restart_backoff_s, worker.backoff_s * 2))
        worker.restart_at = now + (worker.backoff_s if len(worker.restart_times) > 1 else 0.0)
        worker.phase = Phase.RESTARTING
        self.table.supervisor_writer(inc.slot).count_restart()
        log.error("worker %d (pid %d) died (%s); restarting in %.1fs", worker.index, inc.pid,
                  how, worker.restart_at - now, extra=about(worker.index, inc.pid))

    def _notify_systemd(self) -> None:
        """READY=1 once every worker came up or was given up on, one at least serving.

        The services (HAProxy) were started before the monitor ran, so ready
        means players can connect. Then a STATUS line while it changes.
        """
        if self.stopping or not self.notifier.enabled:
            return
        serving = sum(1 for w in self.workers if w.phase in (Phase.READY, Phase.DRAINING))
        failed = sum(1 for w in self.workers if w.phase is Phase.FAILED)
        status = (f"{serving} of {self.n} workers serving"
                  + (f", {failed} failed" if failed else "")
                  + f"; {self.connections()} players")
        if not self.announced_ready:
            if serving == 0 or serving + failed < self.n:
                return
            self.announced_ready = self.notifier.send("READY=1", f"STATUS={status}")
            return
        self.notifier.status(status)

    def _update_auto_drain(self) -> None:
        """Connection thresholds with hysteresis: drain above, ready below a lower mark."""
        s = self.settings
        if not s.drain_above_connections and not s.drain_above_mean_share:
            return
        counts = {w.index: self._connections_of(w) for w in self.workers if w.current}
        if not counts:
            return
        mean = sum(counts.values()) / len(counts)
        for worker in self.workers:
            count = counts.get(worker.index)
            if count is None:
                continue
            limits = []
            if s.drain_above_connections:
                limits.append(s.drain_above_connections)
            if s.drain_above_mean_share and count >= s.drain_min_connections:
                limits.append(mean * (1 + s.drain_above_mean_share))
            if not limits:
                if worker.auto_drain:
                    worker.auto_drain = False
                    log.info("worker %d back to ready (%d connections)", worker.index, count,
                             extra=about(worker.index))
                continue
            limit = min(limits)
            if not worker.auto_drain and count > limit:
                worker.auto_drain = True
                log.warning("worker %d over its threshold (%d > %.0f): no new players",
                            worker.index, count, limit, extra=about(worker.index))
            elif worker.auto_drain and count < limit * s.drain_recover_share:
                worker.auto_drain = False
                log.info("worker %d back under its threshold (%d): ready", worker.index, count,
                         extra=about(worker.index))

    # -- what HAProxy and operators see -----------------------------------

    def _connections_of(self, worker: WorkerHandle) -> int:
        view = self._view(worker.current)
        return view.connections if view is not None else 0

    def connections(self) -> int:
        total = 0
        for worker in self.workers:
            for inc in [worker.current, *worker.retired]:
                view = self._view(inc)
                if view is not None and inc is not None and inc.alive:
                    total += view.connections
        return total

    def decide_breaker(self) -> None:
        """Feed the node's players in back-pressure to the breaker; publish its decision.

        Written every tick, changed or not, so the table always holds the current
        decision whatever happened to an earlier write.
        """
        breaker = self.breaker
        if breaker.update(*self.table.backpressure_counts()):
            log.warning("breaker %s: %.1f%% of the node's players in back-pressure",
                        "open, shedding new subscriptions" if breaker.open else "closed",
                        100 * breaker.share)
        self.table.publish_breaker(breaker.open, breaker.trips)

    def _serving(self, incarnation: Incarnation | None) -> bool:
        view = self._view(incarnation)
        return view is not None and view.state in (WorkerState.READY, WorkerState.DRAINING)

    def agent_reply(self, index: int) -> str:
        worker = self.workers[index]
        # During a reload the predecessor serves the port until its successor is ready.
        serving = self._serving(worker.current) or (
            worker.predecessor is not None and self._serving(worker.predecessor))
        if not serving:
            return "down"
        if worker.operator_drain or worker.auto_drain or self.stopping:
            return "up drain"
        return "up ready"

    def status(self) -> dict:
        workers = []
        for worker in self.workers:
            view = self._view(worker.current)
            workers.append({
                "index": worker.index,
                "port": worker.port,
                "phase": worker.phase.value,
                "pid": worker.current.pid if worker.current else None,
                "agent": self.agent_reply(worker.index),
                "operator_drain": worker.operator_drain,
                "auto_drain": worker.auto_drain,
                "connections": view.connections if view else 0,
                "connections_backpressure": view.connections_backpressure if view else 0,
                "subscriptions": view.subscriptions if view else 0,
                "restarts": len(worker.restart_times),
                "last_exit": worker.last_exit,
                "retiring": [inc.pid for inc in worker.retired if inc.alive],
            })
        totals = self.table.totals()
        return {
            "workers": workers,
            "connections": self.connections(),
            "backpressure_share": self.table.backpressure_share(),
            "breaker_open": self.table.breaker_open(),
            "breaker_trips": self.table.breaker_trips(),
            "totals": totals,
            "fleet": self.table.name,
            "stopping": self.stopping,
            "services": self.services_status(),
        }

    def services_status(self) -> dict[str, dict]:
        """The processes the node runs beside its workers (HAProxy, the aggregator)."""
        out = {}
        for service in self.extra_services:
            name = type(service).__name__.removesuffix("Service").lower()
            pid = getattr(service, "pid", None)
            if pid is None and hasattr(service, "process"):
                pid = service.process.pid
            if name == "metricsserver":
                continue
            out[name] = {"pid": pid, "restarts": getattr(service, "restarts", 0),
                         **({"diverged": service.diverged} if hasattr(service, "diverged")
                            else {})}
        return out

    def haproxy_view(self) -> dict[str, str] | None:
        """HAProxy's own status of each server, when the node runs HAProxy."""
        for service in self.extra_services:
            stats_socket = getattr(service, "stats_socket", None)
            if stats_socket is not None:
                try:
                    return {name: row.get("status", "?")
                            for name, row in read_servers(stats_socket, timeout=2).items()}
                except HAProxyError as exc:
                    return {"error": str(exc)}
        return None

    # -- commands ---------------------------------------------------------

    def _targets(self, request: dict) -> list[WorkerHandle]:
        which = request.get("worker", "all")
        if which == "all":
            return list(self.workers)
        if type(which) is int and 0 <= which < self.n:
            return [self.workers[which]]
        raise ValueError(f"worker must be 0..{self.n - 1} or \"all\", not {which!r}")

    def drain_window_ms(self, players: int, receivers: int | None = None) -> int:
        """The spread of a drained worker's reconnect hints.

        At least OG_DRAIN_WINDOW_MS, and long enough that its players come back
        no faster than OG_DRAIN_RECONNECTS_PER_WORKER_S times the workers that
        take them in (`receivers`; by default those ready now). 5,000 players
        told to return within 500 ms arrive at 10,000 a second; one 2-core
        worker resumed ~470 a second on the bench, so most of them queued
        seconds past their hint.
        """
        if receivers is None:
            receivers = sum(1 for w in self.workers if w.phase is Phase.READY)
        window = self.settings.drain_window_ms
        rate = self.settings.drain_reconnects_per_worker_s * max(1, receivers)
        if rate > 0:
            window = max(window, math.ceil(1000 * players / rate))
        return window

    def _send_away(self, incarnation: Incarnation, settle_ms: int, *,
                   retire: bool = False, region: bool = False) -> None:
        """Drain one process: its players get hints spread over a window fit for them.

        A region's players go to another region, whose size this node cannot
        see: its window assumes as many workers there as here.
        """
        view = self._view(incarnation)
        players = view.connections if view is not None else 0
        window = self.drain_window_ms(players, len(self.workers) if region else None)
        self.table.supervisor_writer(incarnation.slot).request_drain(
            window, settle_ms, retire=retire, region=region)

    def _request_drain(self, worker: WorkerHandle, *, retire: bool = False,
                       settle_ms: int | None = None) -> None:
        if worker.current is not None:
            self._send_away(worker.current,
                            self.settings.drain_settle_ms if settle_ms is None else settle_ms,
                            retire=retire, region=worker.region_drain and not retire)

    async def handle_command(self, request: dict) -> dict:
        cmd = request.get("cmd")
        timeout = float(request.get("timeout", 60))
        if cmd == "status":
            return {"ok": True, **self.status(),
                    "haproxy": await asyncio.to_thread(self.haproxy_view)}
        if cmd == "drain":
            region = bool(request.get("region"))
            targets = self.workers if region else self._targets(request)
            for worker in targets:
                worker.operator_drain = True
                worker.region_drain = region
                if worker.phase is Phase.READY:
                    worker.phase = Phase.DRAINING
                self._request_drain(worker)
            if request.get("wait"):
                done = await self._wait_empty(targets, timeout)
                return {"ok": done, "timed_out": not done, **self.status()}
            return {"ok": True, **self.status()}
        if cmd == "undrain":
            for worker in self._targets(request):
                worker.operator_drain = False
                worker.region_drain = False
                if worker.current:
                    self.table.supervisor_writer(worker.current.slot).cancel_drain()
                if worker.phase is Phase.DRAINING:
                    worker.phase = Phase.READY
            return {"ok": True, **self.status()}
        if cmd == "reload":
            ok, detail = await self.reload(timeout)
            return {"ok": ok, "detail": detail, **self.status()}
        raise ValueError(f"unknown command {cmd!r}")

    async def _wait_empty(self, targets: list[WorkerHandle], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._connections_of(w) == 0 for w in targets):
                return True
            await asyncio.sleep(0.05)
        return False

    async def reload(self, timeout: float) -> tuple[bool, str]:
        """Replace every worker with one running the current code, one at a time."""
        if self._reload_lock.locked():
            return False, "a reload is already running"
        async with self._reload_lock:
            for worker in self.workers:
                old = worker.current
                worker.predecessor = old
                worker.phase = Phase.STARTING
                worker.restart_times.clear()
                new = await self._spawn(worker)
                ready = await self._wait_ready(new, READY_TIMEOUT_S)
                worker.predecessor = None
                if not ready:
                    log.error("reload: worker %d's successor did not become ready", worker.index,
                              extra=about(worker.index, new.pid))
                    await self._terminate(new)
                    worker.current = old
                    worker.phase = Phase.READY if old and old.alive else Phase.RESTARTING
                    return False, f"worker {worker.index}: successor not ready"
                worker.phase = Phase.DRAINING if worker.operator_drain else Phase.READY
                if old is not None and old.alive:
                    old.retiring = True
                    worker.retired.append(old)
                    # The successor already listens on the same port: no settle.
                    self._send_away(old, 0, retire=True)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline and self._view(old) is not None \
                            and self._view(old).connections > 0:
                        await asyncio.sleep(0.05)
                    await self._terminate(old)
                log.info("reload: worker %d now pid %d", worker.index, new.pid,
                         extra=about(worker.index, new.pid))
            return True, "all workers replaced"


def raise_fd_limit(workers: int, connections_per_worker: int) -> int:
    """Raise RLIMIT_NOFILE (inherited by the workers) to what the capacity needs."""
    need = connections_per_worker + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, need)
    if target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            log.warning("RLIMIT_NOFILE hard limit %d is below the %d a worker needs; "
                        "capacity is capped", hard, need)
            target = hard
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
