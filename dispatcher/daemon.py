"""The daemon's lifecycle: instance lock, recovery, the dispatch loop, signals, drain.

One anyio task group owns everything the daemon runs. Start: lock, migrate, recover
what a dead predecessor left, register the instance. Then the dispatch loop claims
work whenever the `global` gate has room. SIGTERM/SIGINT: stop claiming, drain for
`shutdown_grace`, cancel what is left (interrupted, re-queued), release every slot,
exit 0. SIGHUP re-reads the configuration.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import signal
import socket
import uuid
from collections.abc import Callable, Coroutine, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import structlog

from dispatcher import __version__, logs
from dispatcher.clock import Clock, SystemClock
from dispatcher.config import Settings
from dispatcher.errors import ConfigError, DispatcherError, StoreError, Unavailable
from dispatcher.gate import GLOBAL, ConcurrencyGate, Slot
from dispatcher.maintenance import Maintenance
from dispatcher.models import Dispatch, DispatchStatus, Instance
from dispatcher.notify import Notifier
from dispatcher.observe import NullObserver, Observer
from dispatcher.pipeline import CancelReason, InFlight, Pipeline
from dispatcher.planners import task_gate_capacity
from dispatcher.runners.base import Runner
from dispatcher.runners.exec import ExecRunner
from dispatcher.runners.guard import GuardError, process_guard
from dispatcher.runners.noop import NoopRunner
from dispatcher.runners.python import PythonRunner
from dispatcher.service import gate_capacities
from dispatcher.store.base import Store

log = logs.get_logger("dispatcher.daemon")

SELF_CHECK_EVERY = 12
"""Heartbeats between two gate self-checks (a minute at the default interval)."""

SideTask = Callable[..., Coroutine[Any, Any, None]]
"""`f(daemon, *, task_status)`: a service beside the dispatch loop (e.g. the HTTP API).
`tg.start`ed after recovery, it calls `task_status.started()` once it serves and is
cancelled with the daemon's task group; if it fails, the daemon stops."""


class InstanceLock:
    """An exclusive `flock` on `<database>.lock`: one daemon per database."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except OSError as exc:  # e.g. a read-only folder: one line, exit 73, no traceback
            raise StoreError(
                f"cannot open database {self.path.with_suffix('')}: cannot open lock file "
                f"{self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise Unavailable(
                f"another dispatcher daemon (pid {holder}) is running on "
                f"{self.path.with_suffix('')} (lock {self.path} is held)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def build_runners(settings: Settings) -> dict[str, Runner]:
    """One runner object per `[runners.NAME]`."""
    runners: dict[str, Runner] = {}
    for name, spec in settings.runners.items():
        kill_grace = spec.kill_grace if spec.kill_grace is not None else settings.daemon.kill_grace
        if spec.type == "exec":
            runners[name] = ExecRunner(name, kill_grace=kill_grace, env=spec.env, cwd=spec.cwd)
        elif spec.type == "python":
            runners[name] = PythonRunner(name)
        else:
            runners[name] = NoopRunner(name)
    return runners


@dataclass
class DaemonState:
    """What the loop and the signal handler share."""

    stopping: bool = False
    inflight: dict[int, InFlight] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    check_cancels: asyncio.Event = field(default_factory=asyncio.Event)
    drained: asyncio.Event = field(default_factory=asyncio.Event)


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
    ) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.observer: Observer = observer or NullObserver()
        self._side_tasks = tuple(side_tasks)
        self.store = store
        self.clock = clock or SystemClock()
        self.instance_id = uuid.uuid4().hex[:12]
        self._reload = reload
        self.state = DaemonState()
        self.gate = ConcurrencyGate(
            store,
            self.clock,
            self.instance_id,
            gate_capacities(settings),
            on_demand=lambda name: task_gate_capacity(self.settings, name),
            poll_interval=settings.daemon.poll_interval,
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
        self.maintenance = Maintenance(lambda: self.settings, store, self.clock, self.observer)

    async def run(self) -> None:
        """Recover, serve until told to stop, drain; return when everything is released."""
        structlog.contextvars.bind_contextvars(instance_id=self.instance_id)
        await self._start()
        await self._subscribe()
        try:
            # The scheduler starts after recovery and stops once the work has drained.
            async with self.maintenance, anyio.create_task_group() as tg:
                # Signal handlers first: a SIGTERM right after READY must drain, not kill.
                await tg.start(self._signal_loop, tg.cancel_scope)
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(logs.flush_loop)
                tg.start_soon(self._cancel_watch_loop)
                for side_task in self._side_tasks:
                    await tg.start(side_task, self)
                tg.start_soon(self.notifier.watchdog_loop)
                tg.start_soon(
                    self.notifier.status_loop,
                    self.status_line,
                    self.settings.daemon.heartbeat_interval,
                )
                self._started()
                await self._dispatch_loop()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.stop_instance(self.instance_id, self.clock.now())
            log.info("daemon_stopped")

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

    def _database_changed(self) -> None:
        """Another process changed the database (a dispatch inserted, a slot released,
        a cancel requested): look at once instead of at the next poll."""
        self.gate.db_changed()
        self.state.check_cancels.set()
        self.wake()

    async def _subscribe(self) -> None:
        """Listen for other processes' changes (PostgreSQL); polling stays the fallback."""
        try:
            await self.store.subscribe(self._database_changed)
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

    def _start_guard(self) -> None:
        """Start the orphan guard now when steps may start processes (exec and python
        runners, command and python planners), so that everything started from the
        daemon carries its token, what a python step spawns included; a step would
        otherwise start it on the first spawn."""
        settings = self.settings
        if not any(r.type in ("exec", "python") for r in settings.runners.values()) and all(
            t.planner == "steps" for t in settings.tasks.values()
        ):
            return
        try:
            process_guard().start()
        except GuardError as exc:  # exec steps fail one by one, each saying why
            log.error("guardian_start_failed", error=exc.strerror)

    def _database_name(self) -> str:
        url = getattr(self.store, "url", None)
        return str(url) if url is not None else str(self.settings.database.path)

    def _started(self) -> None:
        """Recovered, registered, signal handlers in place: accepting work."""
        log.info(
            "daemon_started",
            version=__version__,
            pid=os.getpid(),
            database=self._database_name(),
            gates=gate_capacities(self.settings),
            guardian_pid=process_guard().pid,
        )
        self.notifier.ready(status=self._inflight_summary())

    # -- the dispatch loop --------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        """Claim work whenever `global` has room; run each dispatch in its own task.

        Every free place is claimed for in one statement: one round trip to the
        database serves many dispatches.
        """
        async with anyio.create_task_group() as work:
            while not self.state.stopping:
                with anyio.CancelScope() as waiting:
                    self._stop_waiting = waiting
                    await self.gate.wait_free(GLOBAL)
                if waiting.cancelled_caught:
                    break
                places = 1
                while self.gate.try_acquire_place(GLOBAL):
                    places += 1
                places = await self._limit_to_room(places)
                claimed = await self._claim(places) if places else []
                for _ in range(places - len(claimed)):
                    self.gate.give_back(GLOBAL)
                for dispatch in claimed:
                    await self._start_dispatch(work, dispatch)
                if not claimed:
                    await self._wait_for_work()
            await self._drain()

    _stop_waiting: anyio.CancelScope | None = None

    async def _limit_to_room(self, places: int) -> int:
        """On a shared store, claim no more than the database's `global` gate has room
        for (other daemons hold places too); the rest of the places go back."""
        try:
            room = max(await self.gate.room(GLOBAL), 0)
        except DispatcherError as exc:
            log.warning("claim_failed", error=str(exc))
            room = 0
        for _ in range(places - min(places, room)):
            self.gate.give_back(GLOBAL)
        return min(places, room)

    async def _claim(self, limit: int) -> list[Dispatch]:
        try:
            return await self.store.claim_many(
                self.instance_id, self.clock.now(), self.gate.full_gates(), limit
            )
        except DispatcherError as exc:  # e.g. the database stayed busy: try again later
            log.warning("claim_failed", error=str(exc))
            return []

    async def _wait_for_work(self) -> None:
        with anyio.move_on_after(self.settings.daemon.poll_interval):
            await self.state.wake.wait()
        self.state.wake.clear()

    async def _start_dispatch(self, work: anyio.abc.TaskGroup, dispatch: Dispatch) -> None:
        holder = f"dispatch:{dispatch.id}"
        task_slot = None
        if dispatch.gate_key is not None and self.gate.has(dispatch.gate_key):
            if not self.gate.try_acquire_place(dispatch.gate_key):
                # Claimed together with another of the same per-task gate: later.
                self.gate.give_back(GLOBAL)
                await self.store.requeue(dispatch.id, self.clock.now())
                return
            task_slot = await self.gate.bind(dispatch.gate_key, holder)
        global_slot = await self._bind_global(dispatch, holder)
        if global_slot is None:
            if task_slot is not None:
                await self.gate.release(task_slot)
            return
        flight = InFlight(dispatch.id)
        self.state.inflight[dispatch.id] = flight
        log.debug("dispatch_claimed", dispatch_id=dispatch.id, task=dispatch.task)
        work.start_soon(self._run_dispatch, dispatch, flight, global_slot, task_slot)

    async def _bind_global(self, dispatch: Dispatch, holder: str) -> Slot | None:
        """The `global` row; on a shared store another daemon may have taken the last
        place since the claim: the dispatch then goes back to the queue."""
        try:
            slot = await self.gate.try_bind(GLOBAL, holder)
        except DispatcherError as exc:
            log.warning("claim_failed", error=str(exc))
            slot = None
        if slot is None:
            self.gate.give_back(GLOBAL)
            with suppress(DispatcherError):
                await self.store.requeue(dispatch.id, self.clock.now())
        return slot

    async def _run_dispatch(
        self, dispatch: Dispatch, flight: InFlight, global_slot: Slot, task_slot: Slot | None
    ) -> None:
        try:
            await self.pipeline.run(dispatch, flight)
        finally:
            del self.state.inflight[dispatch.id]
            if task_slot is not None:
                await self.gate.release(task_slot)
            await self.gate.release(global_slot)
            self.state.wake.set()
            if self.state.stopping and not self.state.inflight:
                self.state.drained.set()

    # -- stop -------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Wait up to `shutdown_grace` for running work, then cancel what is left."""
        grace = self.settings.daemon.shutdown_grace
        if self.state.inflight:
            log.info("drain_started", in_flight=len(self.state.inflight), grace_s=grace)
            with anyio.move_on_after(grace):
                await self.state.drained.wait()
        for flight in list(self.state.inflight.values()):
            flight.cancel(CancelReason.SHUTDOWN)
        log.info("drain_finished", interrupted=len(self.state.inflight))

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
                if self._stop_waiting is not None:
                    self._stop_waiting.cancel()

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
        restart_required = restart_only_changes(self.settings, settings)
        self.settings = settings
        self.pipeline.settings = settings
        self.pipeline.runners = build_runners(settings)
        self.gate.reconfigure(gate_capacities(settings))
        self.maintenance.reschedule(settings)
        log.info(
            "config_reloaded",
            gates=gate_capacities(settings),
            runners=sorted(settings.runners),
            tasks=sorted(settings.tasks),
            restart_required=restart_required,
        )
        self.notifier.ready(status=self._inflight_summary())
        self.state.wake.set()

    # -- side loops ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            await anyio.sleep(self.settings.daemon.heartbeat_interval)
            beats += 1
            try:
                await self.store.heartbeat(self.instance_id, self.clock.now())
                if self.store.shared:
                    await self._reap_dead_instances()
                if beats % SELF_CHECK_EVERY == 0:
                    await self.gate.self_check()
            except DispatcherError as exc:
                log.warning("heartbeat_failed", error=str(exc))

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
                    flight = self.state.inflight.get(dispatch_id)
                    if flight is not None:
                        log.info("dispatch_cancel_requested", dispatch_id=dispatch_id)
                        flight.cancel(CancelReason.USER)


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


def _user_error(group: BaseExceptionGroup[BaseException]) -> DispatcherError | None:
    """The one user-facing error a task group failed with (a side task that could not
    start, e.g. the API's port in use), so it is reported as one line, not a crash."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 and isinstance(leaves[0], DispatcherError):
        return leaves[0]
    return None


async def run_daemon(
    settings: Settings,
    reload: Callable[[], Settings] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """`dispatcher run`: lock the database, open the store, serve until stopped.

    systemd's notification variables are read (and removed from the environment, so
    steps don't inherit them) unless a `notifier` is given.
    """
    from dispatcher.store import open_store

    raise_open_files_limit()
    side_tasks: list[SideTask] = []
    observer: Observer | None = None
    if settings.api.listen is not None:
        from dispatcher.api import ApiServer  # aiohttp and prometheus load only when needed

        api = ApiServer.from_settings(settings)  # reads the token: a ConfigError stops us here
        side_tasks.append(api.serve)
        observer = api.metrics
    notifier = notifier or Notifier.from_environ()
    # On PostgreSQL several daemons share the database: leases replace the OS lock.
    lock = InstanceLock(settings.database.path) if settings.database.url is None else None
    if lock is not None:
        lock.acquire()
    try:
        store = await open_store(settings, daemon=True)
        try:
            daemon = Daemon(
                settings,
                store,
                reload=reload,
                notifier=notifier,
                observer=observer,
                side_tasks=side_tasks,
            )
            try:
                await daemon.run()
            except BaseExceptionGroup as group:
                raise _user_error(group) or group from None
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
    finally:
        if lock is not None:
            lock.release()
