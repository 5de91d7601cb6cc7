"""Scheduled maintenance: APScheduler 3 jobs on the daemon's own event loop.

Two jobs, each on `purge.schedule` (cron, UTC) and once `purge.startup_delay` after
start, so a daemon restarted every day still purges:

- `purge_gates`: released gate rows older than `purge.gate_retention` (`purge.py`);
- `retention`: finished dispatches and their attempts older than `retention.dispatches`.

Each job coalesces missed runs into one, never runs beside itself, and still runs if
the loop was busy past its time by less than `MISFIRE_GRACE`. Each run logs one
event. A run that fails (the database stayed busy) is logged and tried again at the
next scheduled time; it never stops the daemon. On stop, a running job is cancelled
at its next await (a batch is one statement or transaction, so nothing is left half
done) and awaited before the scheduler shuts down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import anyio
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from dispatcher import logs, purge
from dispatcher.clock import Clock
from dispatcher.config import Settings
from dispatcher.errors import DispatcherError
from dispatcher.observe import NullObserver, Observer
from dispatcher.schedules import cron_trigger
from dispatcher.store.base import Store

log = logs.get_logger("dispatcher.maintenance")

PURGE_GATES = "purge_gates"
RETENTION = "retention"
T = TypeVar("T")

MISFIRE_GRACE = 3600
"""Seconds a run may start late (loop busy, host suspended) before it is skipped."""


def cron(settings: Settings) -> CronTrigger:
    """`purge.schedule` as an APScheduler trigger, in UTC, read as a crontab (and a
    schedule's `cron`) reads it: Sunday is day 0."""
    return cron_trigger(settings.purge.schedule, "UTC")


class Maintenance:
    """The scheduler and its jobs; `async with Maintenance(...)` around the daemon's work.

    `settings` is read at each run, so a reloaded `gate_retention`, `batch_size` or
    `retention.dispatches` applies at the next run; `reschedule` applies a new cron.
    """

    def __init__(
        self,
        settings: Callable[[], Settings],
        store: Store,
        clock: Clock,
        observer: Observer | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._observer: Observer = observer or NullObserver()
        self._scheduler: AsyncIOScheduler | None = None
        self._running: dict[asyncio.Task[Any], anyio.CancelScope] = {}
        self._schedule = ""

    async def __aenter__(self) -> Maintenance:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.stop()

    @property
    def scheduler(self) -> AsyncIOScheduler:
        """The running scheduler (for inspection)."""
        if self._scheduler is None:
            raise RuntimeError("maintenance is not started")
        return self._scheduler

    def start(self) -> None:
        """Create the scheduler on the running loop, add both jobs, start it."""
        settings = self._settings()
        scheduler = AsyncIOScheduler(
            event_loop=asyncio.get_running_loop(),
            timezone=UTC,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": MISFIRE_GRACE,
            },
        )
        first = datetime.now(UTC) + timedelta(seconds=settings.purge.startup_delay)
        for job_id, job in ((PURGE_GATES, self.purge_gates), (RETENTION, self.retention)):
            scheduler.add_job(job, cron(settings), id=job_id, name=job_id, next_run_time=first)
        scheduler.start()
        self._scheduler = scheduler
        self._schedule = settings.purge.schedule
        log.info(
            "maintenance_started",
            schedule=settings.purge.schedule,
            first_run=first.isoformat(),
        )

    def reschedule(self, settings: Settings) -> None:
        """Apply a new `purge.schedule` (after a config reload); an unchanged one is kept.

        Rescheduling recomputes the next run from the cron, which would drop a pending
        run after start, hence the check.
        """
        if self._scheduler is None or settings.purge.schedule == self._schedule:
            return
        self._schedule = settings.purge.schedule
        for job_id in (PURGE_GATES, RETENTION):
            self._scheduler.reschedule_job(job_id, trigger=cron(settings))

    async def stop(self) -> None:
        """Cancel running jobs, wait for them, shut the scheduler down (idempotent)."""
        for scope in self._running.values():
            scope.cancel()
        if self._running:
            await asyncio.wait(list(self._running))
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    # -- jobs -------------------------------------------------------------------------

    async def purge_gates(self) -> None:
        """The `purge_gates` job: one run, one `gates_purged` event."""
        run = await self._guarded(PURGE_GATES, self._purge_gates)
        if run is not None:
            self._observer.purge_finished(run.deleted, run.duration_ms / 1000)
            log.info(
                "gates_purged",
                deleted=run.deleted,
                batches=run.batches,
                duration_ms=run.duration_ms,
                before=run.before.isoformat(),
                reclaimed_pages=run.reclaimed_pages,
            )

    async def retention(self) -> None:
        """The `retention` job: one run, one `dispatches_expired` event."""
        run = await self._guarded(RETENTION, self._retention)
        if run is not None and run.before is not None:
            log.info(
                "dispatches_expired",
                deleted=run.dispatches,
                attempts_deleted=run.attempts,
                batches=run.batches,
                duration_ms=run.duration_ms,
                before=run.before.isoformat(),
                reclaimed_pages=run.reclaimed_pages,
            )

    async def _purge_gates(self) -> purge.GatePurge:
        return await purge.purge_gates(self._settings(), self._store, self._clock)

    async def _retention(self) -> purge.RetentionRun:
        return await purge.apply_retention(self._settings(), self._store, self._clock)

    async def _guarded(self, job: str, work: Callable[[], Awaitable[T]]) -> T | None:
        """Run `work` cancellable by `stop`; a store failure is logged, not raised."""
        task = asyncio.current_task()
        assert task is not None, "APScheduler runs coroutine jobs as tasks"
        result: T | None = None
        with anyio.CancelScope() as scope:
            self._running[task] = scope
            try:
                # Several daemons on one PostgreSQL database: one of them purges.
                async with self._store.maintenance_lock(job) as mine:
                    if mine:
                        result = await work()
                    else:
                        log.info("maintenance_job_skipped", job=job, reason="another instance")
            except DispatcherError as exc:
                log.warning("maintenance_job_failed", job=job, error=str(exc))
            finally:
                del self._running[task]
        if scope.cancelled_caught:
            log.info("maintenance_job_interrupted", job=job)
        return result
