"""The daemon's lifecycle: recovery, the side loops, signals, drain.

One anyio task group owns everything the daemon runs. Start: lock (SQLite:
`dispatcher.store.sqlite.lock`), migrate, recover what a dead predecessor left,
register the instance. Then the claim loop (`dispatcher.claims`) claims work whenever
the `global` gate has room. SIGTERM/SIGINT: stop claiming, drain for
`shutdown_grace`, cancel what is left (interrupted, re-queued), release every slot,
exit 0. SIGHUP re-reads the configuration.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import anyio
import anyio.lowlevel
import structlog

from dispatcher import __version__, logs
from dispatcher.activity import Activity
from dispatcher.claims import ClaimLoop, DaemonState
from dispatcher.clock import Clock, SystemClock
from dispatcher.config import Settings
from dispatcher.errors import (
    ConfigError,
    DatabaseCorrupt,
    DispatcherError,
    LeaseLost,
)
from dispatcher.gate import ConcurrencyGate, GateState, gate_capacities, task_gate_capacity
from dispatcher.lease import Lease, LeaseState
from dispatcher.maintenance import Maintenance
from dispatcher.models import DispatchStatus, Instance
from dispatcher.observe import NullObserver, Observer, Observers
from dispatcher.pipeline import CancelReason, InFlight, Pipeline
from dispatcher.planners import planner_of
from dispatcher.runners.base import RUNNER_TYPES, Runner
from dispatcher.runners.orphan_guard import GuardError, process_guard
from dispatcher.schedules import Schedules
from dispatcher.service import schedule_dispatch
from dispatcher.store.base import Store
from dispatcher.systemd import Notifier

log = logs.get_logger("dispatcher.daemon")

SELF_CHECK_EVERY = 12
"""Heartbeats between two self-checks of the gate and of this instance's dispatches (a
minute at the default interval). They also run right after a database outage ends."""

REJOIN_WAIT = 30.0
"""Seconds a daemon that lost its lease waits for its ended steps before it rejoins."""

CHECK_BUDGET = 10.0
"""Seconds the look for damage at start may take (a larger database is checked in
part; `dispatcher check-db` reads all of it)."""


class SideTask(Protocol):
    """`f(daemon, *, task_status)`: a service beside the claim loop (e.g. the HTTP API,
    which takes the daemon as its narrow `api.DaemonView`). `tg.start`ed after recovery,
    it calls `task_status.started()` once it serves and is cancelled with the daemon's
    task group; if it fails, the daemon stops."""

    async def __call__(
        self, daemon: Daemon, *, task_status: anyio.abc.TaskStatus[None] = ...
    ) -> None: ...


def build_runners(settings: Settings) -> dict[str, Runner]:
    """One runner object per `[runners.NAME]`, made by its type (see `RUNNER_TYPES`)."""
    return {
        name: RUNNER_TYPES.require(spec.type).build(name, spec, settings)
        for name, spec in settings.runners.items()
    }


def spawns_processes(settings: Settings) -> bool:
    """Whether steps or planners of this configuration may start processes."""
    runners = (RUNNER_TYPES.require(spec.type) for spec in settings.runners.values())
    return any(kind.spawns_processes for kind in runners) or any(
        planner_of(task).spawns_processes for task in settings.tasks.values()
    )


class Daemon:
    """One run of the daemon process on one store."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clock: Clock | None = None,
        reload: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
        observer: Observer | None = None,
        side_tasks: Sequence[SideTask] = (),
        owns_process: bool = False,
    ) -> None:
        self.settings = settings
        self._owns_process = owns_process
        """Run by `dispatcher run`: the process is the daemon's alone, and what is tuned
        for the whole process (the cyclic collector, the GIL's switch interval) is tuned
        for it once started. A
        daemon run inside another program (a test) leaves that program's settings be."""
        self.notifier = notifier or Notifier()
        self._side_tasks = tuple(side_tasks)
        self.store = store
        self.clock = clock or SystemClock()
        self.activity = Activity(self.clock)
        """The last hour of this daemon, for the status page."""
        self.observer: Observer = Observers(self.activity, observer or NullObserver())
        self.instance_id = uuid.uuid4().hex[:12]
        self._reload = reload
        self.state = DaemonState()
        self.lease = Lease(settings.daemon.instance_ttl)
        """This instance's lease on a shared store (see `dispatcher.lease`)."""
        self._self_check_now = asyncio.Event()
        self.gate = ConcurrencyGate(
            store,
            self.clock,
            self.instance_id,
            gate_capacities(settings),
            on_demand=lambda name: task_gate_capacity(self.settings, name),
            poll_interval=settings.daemon.poll_interval,
            task_gates=lambda: any(task.concurrency for task in self.settings.tasks.values()),
        )
        self.pipeline = Pipeline(
            settings=settings,
            store=store,
            gate=self.gate,
            clock=self.clock,
            runners=build_runners(settings),
            instance_id=self.instance_id,
            observer=self.observer,
        )
        self.claims = ClaimLoop(
            self.state,
            settings=lambda: self.settings,
            store=store,
            gate=self.gate,
            pipeline=self.pipeline,
            clock=self.clock,
            lease=self.lease,
            observer=self.observer,
            instance_id=self.instance_id,
            while_fenced=self._while_fenced,
        )
        self.maintenance = Maintenance(lambda: self.settings, store, self.clock, self.observer)
        self.schedules = Schedules(
            settings,
            store,
            self.clock,
            lambda name, spec, at: schedule_dispatch(self.settings, name, spec, at),
            self.observer,
            on_dispatched=self.wake,
        )

    async def run(self) -> None:
        """Recover, serve until told to stop, drain; return when everything is released.

        Raises `DatabaseCorrupt` when the database turns out damaged while it runs: the
        daemon then stops at once (nothing more can be written) with a non-zero exit.
        """
        structlog.contextvars.bind_contextvars(instance_id=self.instance_id)
        self.store.on_fatal = self._database_corrupt
        self.store.on_available = self._database_back
        self.store.on_lease_lost = self._lease_lost
        await self._start()
        await self._subscribe()
        try:
            # The scheduler starts after recovery and stops once the work has drained.
            async with self.maintenance, anyio.create_task_group() as tg:
                # Signal handlers first: a SIGTERM right after READY must drain, not kill.
                await tg.start(self._signal_loop, tg.cancel_scope)
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._self_check_loop)
                if self.store.shared:
                    tg.start_soon(self._lease_loop)
                tg.start_soon(logs.flush_loop)
                tg.start_soon(self._cancel_watch_loop)
                await tg.start(self.schedules.run, self.maintenance.scheduler)
                for side_task in self._side_tasks:
                    await tg.start(side_task, self)
                tg.start_soon(self.notifier.watchdog_loop)
                tg.start_soon(
                    self.notifier.status_loop,
                    self.status_line,
                    self.settings.daemon.heartbeat_interval,
                )
                self._started()
                if self._owns_process:
                    _tune_process()
                await self.claims.run()
                tg.cancel_scope.cancel()
        finally:
            if self.store.shared:  # no steps left to fence: the guardian's deadline goes
                process_guard().lease(0)
            if self.state.fatal is None:
                with anyio.CancelScope(shield=True), suppress(DispatcherError):
                    await self.store.stop_instance(self.instance_id, self.clock.now())
            log.info("daemon_stopped")
        if self.state.fatal is not None:
            raise self.state.fatal

    def stop(self) -> None:
        """Stop claiming new work; the drain starts (idempotent)."""
        if not self.state.stopping:
            self.state.stopping = True
            log.info("daemon_stopping", in_flight=len(self.state.inflight))
            self.notifier.stopping(status=f"stopping: {self._inflight_summary()}")
        self.state.wake.set()

    async def status_line(self) -> str:
        """One line for `systemctl status`: in flight, queued, stopping."""
        try:
            queued = (await self.store.count_by_status()).get(DispatchStatus.QUEUED, 0)
        except DispatcherError:
            queued = None
        line = self._inflight_summary()
        if queued is not None:
            line += f", {queued} queued"
        return f"stopping: {line}" if self.state.stopping else line

    def _inflight_summary(self) -> str:
        return f"{len(self.state.inflight)} in flight (global cap {self.settings.gate.global_})"

    def wake(self) -> None:
        """New work may be there: claim at once instead of at the next poll."""
        self.state.wake.set()

    def cancel(self, dispatch_id: int, reason: CancelReason) -> bool:
        """Stop a dispatch this daemon runs now, its end recorded as `reason` says; False
        when it does not run here (ended, queued, or run by another daemon)."""
        flight = self.state.inflight.get(dispatch_id)
        if flight is None:
            return False
        flight.cancel(reason)
        return True

    @property
    def in_flight(self) -> Mapping[int, InFlight]:
        """What this daemon runs now, by dispatch id: a read-only view (for the API and
        the status page; `cancel` stops one)."""
        return MappingProxyType(self.state.inflight)

    @property
    def stopping(self) -> bool:
        """Whether the drain has started: no new work is claimed."""
        return self.state.stopping

    def gate_snapshot(self) -> list[GateState]:
        """Every gate's capacity and places held, now."""
        return self.gate.snapshot()

    def _database_corrupt(self, exc: DatabaseCorrupt) -> None:
        """The store found the database damaged: stop now, not drain (nothing lands)."""
        if self.state.fatal is None:
            self.state.fatal = exc
            for flight in list(self.state.inflight.values()):
                flight.cancel(CancelReason.SHUTDOWN)
            self.stop()
            self.claims.stop_waiting()

    def _database_back(self) -> None:
        """Queued writes land again after an outage: check our own rows at once."""
        self._self_check_now.set()

    async def self_check(self) -> list[int]:
        """Put back in the queue what this live instance marked in flight but does not run
        (a write lost before it was retried, a claim whose start failed): the repair
        that recovery does at start, without a restart. Answers the ids requeued."""
        async with self.claims.claiming:  # no claim is half-way while we compare
            keep = set(self.state.inflight)
            # What finished before `keep` was taken is final in the database first.
            await self.store.flush()
            requeued = await self.store.requeue_abandoned(self.instance_id, keep, self.clock.now())
        for dispatch_id in requeued:
            log.warning("dispatch_requeued", dispatch_id=dispatch_id, reason="self_check")
        if requeued:
            self.wake()
        return requeued

    def _database_changed(self) -> None:
        """Another process changed the database (a dispatch inserted, a slot released,
        a cancel requested): look at once instead of at the next poll."""
        self.gate.db_changed()
        self.state.check_cancels.set()
        self.wake()

    def _cancel_requested(self) -> None:
        """A cancel request was committed (PostgreSQL): look for ours."""
        self.state.check_cancels.set()

    def _slots_released(self) -> None:
        """A daemon released gate rows (PostgreSQL: one wake-up per batch of writes):
        waiters for a shared place ask again; the dispatch loop claims again only when
        the shared cap, not an empty queue, stopped its last claim."""
        self.gate.db_changed()
        if self.claims.waiting_for_room:
            self.wake()

    async def _subscribe(self) -> None:
        """Listen for other processes' changes (PostgreSQL); polling stays the fallback."""
        try:
            await self.store.subscribe(
                self._database_changed,
                on_cancel=self._cancel_requested,
                on_released=self._slots_released,
            )
        except DispatcherError as exc:
            log.warning("listen_failed", error=str(exc), fallback="polling")

    # -- start -------------------------------------------------------------------------

    async def _start(self) -> None:
        now = self.clock.now()
        report = await self.store.recover(self.instance_id, now)
        log.info(
            "daemon_recovered",
            slots_released=report.slots_released,
            attempts_interrupted=report.attempts_interrupted,
            dispatches_requeued=report.dispatches_requeued,
        )
        self._start_guard()
        await self._register(now)

    async def _register(self, now: datetime) -> None:
        """Insert this instance's row: its lease, renewed from now on by heartbeats."""
        await self.store.register_instance(
            Instance(
                id=self.instance_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                version=__version__,
                started_at=now,
                heartbeat_at=now,
                stopped_at=None,
            )
        )
        self.store.lease = self.instance_id
        self.lease.restart()
        self._guard_lease(time.monotonic())

    def _start_guard(self) -> None:
        """Start the orphan guard now when steps may start processes (runner types and
        planners say whether theirs do), so that everything started from the daemon
        carries its token, what a python step spawns included; a step would otherwise
        start it on the first spawn."""
        if not spawns_processes(self.settings):
            return
        try:
            process_guard().start()
        except GuardError as exc:  # exec steps fail one by one, each saying why
            log.error("guardian_start_failed", error=exc.strerror)

    def _started(self) -> None:
        """Recovered, registered, signal handlers in place: accepting work."""
        log.info(
            "daemon_started",
            version=__version__,
            pid=os.getpid(),
            database=self.store.database,
            gates=gate_capacities(self.settings),
            guardian_pid=process_guard().pid,
        )
        self.notifier.ready(status=self._inflight_summary())

    # -- stop -------------------------------------------------------------------------

    async def _signal_loop(
        self, scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("signal_received", signal="SIGHUP")
                    self._reload_config()
                    continue
                log.info("signal_received", signal=signal.Signals(signum).name)
                if self.state.stopping:
                    # A second signal: stop waiting for the grace period.
                    for flight in list(self.state.inflight.values()):
                        flight.cancel(CancelReason.SHUTDOWN)
                self.stop()
                self.claims.stop_waiting()

    def _reload_config(self) -> None:
        if self._reload is None:
            return
        self.notifier.reloading()
        try:
            settings = self._reload()
        except ConfigError as exc:
            log.error("config_reload_failed", error=str(exc), kept="the running configuration")
            self.notifier.ready(status=f"reload refused: {exc}")
            return
        if settings == self.settings:
            # Nothing new: say so. (In a container, a single-file bind mount keeps the
            # old file when an editor on the host replaces it: docs/deploy.md.)
            log.info("config_unchanged", config=str(settings.source))
            self.notifier.ready(status=self._inflight_summary())
            return
        restart_required = restart_only_changes(self.settings, settings)
        self.settings = settings
        self.pipeline.settings = settings
        self.pipeline.runners = build_runners(settings)
        self.gate.reconfigure(gate_capacities(settings))
        self.maintenance.reschedule(settings)
        self.schedules.reload(settings)
        log.info(
            "config_reloaded",
            gates=gate_capacities(settings),
            runners=sorted(settings.runners),
            tasks=sorted(settings.tasks),
            schedules=sorted(settings.schedules),
            restart_required=restart_required,
        )
        self.notifier.ready(status=self._inflight_summary())
        self.state.wake.set()

    # -- side loops ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.daemon.heartbeat_interval)
            sent_at = time.monotonic()
            try:
                await self.store.heartbeat(self.instance_id, self.clock.now())
            except LeaseLost:
                continue  # the store told `_lease_lost`; the dispatch loop rejoins
            except DispatcherError as exc:
                log.warning("heartbeat_failed", error=str(exc))
                continue
            ended_fence = self.lease.renewed(sent_at)
            self._guard_lease(sent_at)
            if ended_fence:
                log.info("lease_renewed", silent_s=round(time.monotonic() - sent_at, 3))
                self.wake()
            if self.store.shared:
                with suppress(DispatcherError):
                    await self._reap_dead_instances()

    async def _self_check_loop(self) -> None:
        """The self-checks of this instance's dispatches and of the gate: every
        `SELF_CHECK_EVERY` heartbeats, and right after a database outage ends."""
        while True:
            every = self.settings.daemon.heartbeat_interval * SELF_CHECK_EVERY
            with anyio.move_on_after(every):
                await self._self_check_now.wait()
            self._self_check_now.clear()
            try:
                await self.self_check()
                await self.gate.self_check()
            except DispatcherError as exc:
                log.warning("self_check_failed", error=str(exc))

    # -- the lease (shared stores) -----------------------------------------------------

    async def _lease_loop(self) -> None:
        """End our steps before another daemon may reap them: once the lease has not been
        renewed for `lease.fence_after` seconds (a heartbeat that cannot reach the
        database, a partition), nothing runs and nothing is claimed until it is."""
        every = min(self.settings.daemon.heartbeat_interval / 2, 0.25)
        while True:
            await anyio.sleep(every)
            if self.lease.due_for_fence():
                self.lease.fence()
                log.error(
                    "lease_expiring",
                    silent_s=round(self.lease.silent_for(), 3),
                    ttl_s=self.settings.daemon.instance_ttl,
                    in_flight=len(self.state.inflight),
                    action="ending running steps before another daemon may reap them",
                )
                self._end_all(CancelReason.LEASE)

    def _guard_lease(self, renewed_at: float) -> None:
        """Tell the guardian the lease's deadline, so that it ends our steps even when
        this process cannot (frozen by SIGSTOP, a paused VM): the same `fence_after`
        from the renewal as our own `_lease_loop`."""
        if self.store.shared:
            left = self.lease.fence_after - (time.monotonic() - renewed_at)
            process_guard().lease(max(round(left * 1000), 1))

    def _lease_lost(self, exc: LeaseLost) -> None:
        """A write or a heartbeat found our lease taken: another daemon reaped our work.
        End everything now; the dispatch loop then rejoins as a new instance."""
        if not self.lease.lose():
            return
        log.error(
            "lease_lost",
            error=str(exc),
            in_flight=len(self.state.inflight),
            action="ending running steps, then rejoining as a new instance",
        )
        self._end_all(CancelReason.LEASE)

    def _end_all(self, reason: CancelReason) -> None:
        for flight in list(self.state.inflight.values()):
            flight.cancel(reason)
        self.claims.stop_waiting()
        self.wake()

    async def _while_fenced(self) -> None:
        """Claim nothing until the lease is renewed (fenced) or rejoin (lost)."""
        if self.lease.state is LeaseState.LOST:
            await self._rejoin()
            return
        await self.claims.wait_for_work()

    async def _rejoin(self) -> None:
        """After a lost lease: wait for our steps to end, let the fenced writes go, and
        carry on as a new instance with a new lease."""
        if self.state.inflight:
            with anyio.move_on_after(REJOIN_WAIT):
                await self.state.idle.wait()
        with suppress(DispatcherError):
            await self.store.flush()  # refused by the fence: dropped, not retried
        old = self.instance_id
        self.instance_id = uuid.uuid4().hex[:12]
        self.gate.instance_id = self.instance_id
        self.pipeline.instance_id = self.instance_id
        self.claims.instance_id = self.instance_id
        structlog.contextvars.bind_contextvars(instance_id=self.instance_id)
        try:
            await self._register(self.clock.now())
        except DispatcherError as exc:  # unreachable again: stay lost, try next round
            log.warning("lease_rejoin_failed", error=str(exc))
            self.lease.lose()
            await self.claims.wait_for_work()
            return
        log.warning("lease_rejoined", old_instance_id=old, in_flight=len(self.state.inflight))

    async def _reap_dead_instances(self) -> None:
        """Leases: free what instances silent for over `instance_ttl` hold (any live
        daemon does it, so a dead host never keeps slots)."""
        report = await self.store.reap_dead_instances(
            self.instance_id, self.clock.now(), self.settings.daemon.instance_ttl
        )
        if report.slots_released or report.attempts_interrupted or report.dispatches_requeued:
            log.warning(
                "dead_instances_reaped",
                slots_released=report.slots_released,
                attempts_interrupted=report.attempts_interrupted,
                dispatches_requeued=report.dispatches_requeued,
            )
            self._database_changed()

    async def _cancel_watch_loop(self) -> None:
        """Cancel in-flight dispatches that `dispatcher cancel` flagged in the database."""
        while True:
            with anyio.move_on_after(self.settings.daemon.poll_interval):
                await self.state.check_cancels.wait()
            self.state.check_cancels.clear()
            if not self.state.inflight:
                continue
            with suppress(DispatcherError):
                for dispatch_id in await self.store.cancel_requests(list(self.state.inflight)):
                    if dispatch_id in self.state.inflight:
                        log.info("dispatch_cancel_requested", dispatch_id=dispatch_id)
                        self.cancel(dispatch_id, CancelReason.USER)


NR_OPEN_FALLBACK = 1024 * 1024
"""The kernel's usual `fs.nr_open`: what "no hard limit" can be raised to at most."""


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open descriptors to its hard limit (idle API
    connections, steps' pipes and the database all need them); logged. The new soft
    limit (steps inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.info("open_files_limit", soft=soft, hard=hard)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open_files_limit", soft=soft, hard=hard, not_raised=str(exc))
        return soft
    log.info("open_files_limit", soft=target, hard=hard, raised_from=soft)
    return target


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return NR_OPEN_FALLBACK


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """Settings that changed but only take effect at the next start, not on reload."""
    changed = [] if old.database == new.database else ["database"]
    changed += [
        f"log.{key}"
        for key in ("level", "format")
        if getattr(old.log, key) != getattr(new.log, key)
    ]
    return changed


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The exceptions inside `exc`, groups opened all the way down, in order."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in leaf_errors(inner)]


def crash_summary(exc: BaseException) -> list[str]:
    """`Type: message` of every leaf of a crash, for the one `daemon_crashed` line (its
    `exception` field has each one's frames too)."""
    return [f"{type(leaf).__name__}: {leaf}" for leaf in leaf_errors(exc)]


def _user_error(group: BaseExceptionGroup[BaseException]) -> DispatcherError | None:
    """The one user-facing error a task group failed with (a side task that could not
    start, e.g. the API's port in use), so it is reported as one line, not a crash."""
    leaves = leaf_errors(group)
    if len(leaves) == 1 and isinstance(leaves[0], DispatcherError):
        return leaves[0]
    return None


async def _check_database(store: Store) -> None:
    """A bounded look for damage before anything is written (`DatabaseCorrupt` stops the
    start with one line saying how to recover)."""
    started = anyio.current_time()
    verdict = await store.check(budget=CHECK_BUDGET)
    elapsed_ms = round((anyio.current_time() - started) * 1000)
    log.info("database_checked", database=store.database, result=verdict, duration_ms=elapsed_ms)


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation (Python's default is
700): a dispatch allocates hundreds of objects that reference counting frees, so the
default collects every few dispatches for next to nothing."""

SWITCH_INTERVAL = 0.0001
"""Seconds a thread waiting for the GIL waits before it asks the running one to let go
(Python's default is 0.005). The store's thread needs the GIL a few times a batch, to
start a statement and to hand back its result; while the loop is busy with dispatches,
each of those waits would last the whole interval, and the batch would only go on once
the loop had nothing left to do. Measured on a drain of 10,000 (docs/benchmarks.md):
the loop idle 24 % of the time at the default, 15 % here."""


def _tune_process() -> None:
    """Once started, for a process that is the daemon's alone.

    - What the start built (modules, configuration, connections) lives as long as the
      daemon: frozen, the cyclic collector no longer scans it at each full collection
      (about 30 ms each, every second or so under load, before). Measured on a drain of
      20,000 dispatches: 0.77 s in the collector, 0.09 s after.
    - The GIL changes hands sooner (`SWITCH_INTERVAL`).
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    sys.setswitchinterval(SWITCH_INTERVAL)


async def run_daemon(
    settings: Settings,
    reload: Callable[[], Settings] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """`dispatcher run`: lock the database, open the store, serve until stopped.

    systemd's notification variables are read (and removed from the environment, so
    steps don't inherit them) unless a `notifier` is given.
    """
    from dispatcher.store import daemon_lock, open_store

    raise_open_files_limit()
    side_tasks: list[SideTask] = []
    observer: Observer | None = None
    if settings.api.listen is not None:
        from dispatcher.api import ApiServer  # aiohttp and prometheus load only when needed

        api = ApiServer.from_settings(settings)  # reads the token: a ConfigError stops us here
        side_tasks.append(api.serve)
        observer = api.metrics
    notifier = notifier or Notifier.from_environ()
    with daemon_lock(settings) as held:  # SQLite: one daemon per file; PostgreSQL: leases
        if held is not None:  # the guardian holds the lock too: killed, we keep it held
            process_guard().hold(held)  # until our steps are gone (store/sqlite/lock.py)
        store = await open_store(settings, daemon=True)
        try:
            await _check_database(store)
            daemon = Daemon(
                settings,
                store,
                reload=reload,
                notifier=notifier,
                observer=observer,
                side_tasks=side_tasks,
                owns_process=True,
            )
            try:
                await daemon.run()
            except BaseExceptionGroup as group:
                raise _user_error(group) or group from None
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
