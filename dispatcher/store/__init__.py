"""Persistence. Only this package speaks SQL; everyone else calls `Store` verbs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

from dispatcher.store.base import Access, Store

if TYPE_CHECKING:
    from dispatcher.config import Settings
    from dispatcher.store.sqlite.lock import InstanceLock

__all__ = ["Access", "Store", "daemon_lock", "open_store"]


async def open_store(
    settings: Settings, *, daemon: bool = False, access: Access = Access.CREATE
) -> Store:
    """The store the configuration names: PostgreSQL with `[database] url`, else the
    SQLite file at `[database] path`. `daemon` selects the daemon's longer patience
    with a busy SQLite database; `access` what the command may do (see `Access`)."""
    db = settings.database
    if db.url is not None:
        from dispatcher.store.postgres import PostgresStore

        return await PostgresStore.open(
            db.url,
            instance_ttl=settings.daemon.instance_ttl,
            max_size=db.pool_size,
            read_only=access is Access.READ,
        )
    from dispatcher.store.sqlite import SQLiteStore

    patience = max(db.busy_patience, db.busy_timeout) if daemon else None
    return await SQLiteStore.open(
        db.path,
        busy_timeout_ms=round(db.busy_timeout * 1000),
        busy_patience=patience,
        mode=access,
        config=settings.source,
    )


def daemon_lock(settings: Settings) -> AbstractContextManager[int | None]:
    """What keeps a second daemon off the database the configuration names, held from
    before the store opens until it is closed: the instance lock beside a SQLite file
    (`Unavailable` when another daemon holds it); nothing on PostgreSQL, where several
    daemons share the database under leases (`dispatcher.lease`).

    Entered, it gives the descriptor that holds the lock, for the daemon's guardian to
    inherit (`OrphanGuard.hold`: the lock then outlives a killed daemon until its steps
    are gone), or None when there is nothing to hold."""
    if settings.database.url is not None:
        return nullcontext(None)
    from dispatcher.store.sqlite.lock import InstanceLock

    return _holding(InstanceLock(settings.database.path))


@contextmanager
def _holding(lock: InstanceLock) -> Iterator[int | None]:
    with lock:
        yield lock.fileno()
