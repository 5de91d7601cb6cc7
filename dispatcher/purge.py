"""Purge of released gate rows and retention of finished dispatches: service functions.

The daemon's scheduled jobs (`maintenance.py`) and `dispatcher purge` call the same
functions. Each deletes in batches through store verbs, one committed statement (or
transaction) per batch, and yields to the event loop between batches, so the daemon
keeps dispatching while a large purge runs. They never log: the caller does (the CLI
prints, the jobs log one event per run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio.lowlevel

from dispatcher.clock import Clock
from dispatcher.config import Settings
from dispatcher.store.base import Store

RECLAIM_MAX_STEPS = 100_000
"""A bound on `reclaim_space` steps in one run (each step frees up to 1000 pages)."""


@dataclass(frozen=True, slots=True)
class GatePurge:
    """One run of the gate purge (or what it would do, when `dry_run`)."""

    before: datetime
    deleted: int
    """Rows deleted; with `dry_run`, rows that would be."""
    batches: int
    reclaimed_pages: int
    duration_ms: float
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class RetentionRun:
    """One run of dispatch retention; `before` is None when dispatches are kept forever."""

    before: datetime | None
    dispatches: int
    attempts: int
    batches: int
    reclaimed_pages: int
    duration_ms: float
    dry_run: bool = False


def gate_cutoff(settings: Settings, now: datetime) -> datetime:
    """Released gate rows older than this go: `now - purge.gate_retention`."""
    return now - timedelta(seconds=settings.purge.gate_retention)


def retention_cutoff(settings: Settings, now: datetime) -> datetime | None:
    """Finished dispatches older than this go; None when `retention.dispatches` is 0."""
    keep = settings.retention.dispatches
    return None if keep <= 0 else now - timedelta(seconds=keep)


async def purge_gates(
    settings: Settings, store: Store, clock: Clock, *, dry_run: bool = False
) -> GatePurge:
    """Delete released gate rows older than `purge.gate_retention`, batch by batch.

    Never a held row. After deleting, free pages go back to the file system in steps
    (no blocking VACUUM) and the planner's statistics are refreshed.
    """
    started = time.perf_counter()
    before = gate_cutoff(settings, clock.now())
    if dry_run:
        count = await store.count_purgeable(before)
        return GatePurge(before, count, 0, 0, _ms_since(started), dry_run=True)
    deleted = batches = 0
    batch_size = settings.purge.batch_size
    while True:
        count = await store.purge_released(before, batch_size)
        deleted += count
        batches += 1 if count else 0
        if count < batch_size:
            break
        await anyio.lowlevel.checkpoint()  # let the daemon in between batches
    reclaimed = await reclaim_space(store) if deleted else 0
    return GatePurge(before, deleted, batches, reclaimed, _ms_since(started))


async def apply_retention(
    settings: Settings, store: Store, clock: Clock, *, dry_run: bool = False
) -> RetentionRun:
    """Delete finished dispatches (and their attempts) older than `retention.dispatches`.

    Queued and in-flight dispatches are never deleted, whatever their age. A deleted
    dispatch's idempotency key is free again; a retained one's keeps answering.
    """
    started = time.perf_counter()
    before = retention_cutoff(settings, clock.now())
    if before is None:
        return RetentionRun(None, 0, 0, 0, 0, _ms_since(started), dry_run=dry_run)
    if dry_run:
        found = await store.count_expired_dispatches(before)
        return RetentionRun(
            before, found.dispatches, found.attempts, 0, 0, _ms_since(started), dry_run=True
        )
    dispatches = attempts = batches = 0
    batch_size = settings.retention.batch_size
    while True:
        gone = await store.purge_finished_dispatches(before, batch_size)
        dispatches, attempts = dispatches + gone.dispatches, attempts + gone.attempts
        batches += 1 if gone.dispatches else 0
        if gone.dispatches < batch_size:
            break
        await anyio.lowlevel.checkpoint()
    reclaimed = await reclaim_space(store) if dispatches else 0
    return RetentionRun(before, dispatches, attempts, batches, reclaimed, _ms_since(started))


async def reclaim_space(store: Store) -> int:
    """Give free pages back in small steps, yielding between them; then `optimize`."""
    total = 0
    for _ in range(RECLAIM_MAX_STEPS):
        pages = await store.reclaim_space()
        if pages == 0:
            break
        total += pages
        await anyio.lowlevel.checkpoint()
    await store.optimize()
    return total


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


# -- answers ----------------------------------------------------------------------------


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def gate_purge_json(run: GatePurge) -> dict[str, Any]:
    """The `gates` part of `dispatcher purge --json`."""
    if run.dry_run:
        return {"before": _ts(run.before), "purgeable": run.deleted}
    return {
        "before": _ts(run.before),
        "deleted": run.deleted,
        "batches": run.batches,
        "reclaimed_pages": run.reclaimed_pages,
        "duration_ms": run.duration_ms,
    }


def retention_json(run: RetentionRun) -> dict[str, Any]:
    """The `dispatches` part of `dispatcher purge --json` (`before` null: kept forever)."""
    if run.dry_run:
        return {"before": _ts(run.before), "expired": run.dispatches, "attempts": run.attempts}
    return {
        "before": _ts(run.before),
        "deleted": run.dispatches,
        "attempts_deleted": run.attempts,
        "batches": run.batches,
        "reclaimed_pages": run.reclaimed_pages,
        "duration_ms": run.duration_ms,
    }
