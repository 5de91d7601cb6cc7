"""Wake-ups across processes on one SQLite file (`dispatcher.wake`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dispatcher import wake
from dispatcher.errors import StoreError
from dispatcher.models import NewDispatch
from dispatcher.store.sqlite import SQLiteStore

NOW = datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC)


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self, within: float = 2.0) -> None:
        await asyncio.wait_for(self.event.wait(), within)
        self.event.clear()


async def test_a_datagram_reaches_the_listener_of_the_same_file_by_any_path(
    tmp_path: Path,
) -> None:
    (tmp_path / "dir").mkdir()
    database = tmp_path / "dir" / "d.db"
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    wakes = Wakes()
    listener = wake.Listener(database, wakes)
    listener.start()
    try:
        wake.send(tmp_path / "link" / "d.db")
        await wakes.next()
        wake.send(tmp_path / "other.db")  # another database: not ours
        await asyncio.sleep(0.1)
        assert wakes.count == 1
    finally:
        listener.close()
    wake.send(database)  # nobody listens: nothing happens, nothing raises
    await asyncio.sleep(0.05)
    assert wakes.count == 1


async def test_a_submission_from_another_store_wakes_the_subscribed_one(
    store: SQLiteStore,
) -> None:
    wakes = Wakes()
    await store.subscribe(wakes)
    other = await SQLiteStore.open(store.path)  # what the CLI opens
    try:
        await other.check_and_reserve(NewDispatch(task="t", params={}, key="k"), NOW)
        await wakes.next()
        # The same key again creates nothing: no wake-up for it.
        await other.check_and_reserve(NewDispatch(task="t", params={}, key="k"), NOW)
        await other.reserve_many([NewDispatch(task="t", params={"i": 1})], NOW)
        await wakes.next()
    finally:
        await other.close()
    await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)  # its own: no datagram
    await asyncio.sleep(0.1)
    assert wakes.count == 2


async def test_a_second_listener_on_the_file_is_refused_with_a_store_error(
    store: SQLiteStore,
) -> None:
    await store.subscribe(lambda: None)
    other = await SQLiteStore.open(store.path)
    try:
        with pytest.raises(StoreError, match="cannot listen for wake-ups"):
            await other.subscribe(lambda: None)
    finally:
        await other.close()


async def test_a_flood_of_datagrams_wakes_the_daemon_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    wakes = Wakes()
    listener = wake.Listener(tmp_path / "d.db", wakes)
    listener.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while loop.time() - started < 0.2:
            wake.send(tmp_path / "d.db")
            await asyncio.sleep(0)
        await asyncio.sleep(2 * wake.MIN_SPACING)
    finally:
        listener.close()
    took = loop.time() - started
    # Every burst is answered (the first at once, the last one included), yet no more
    # often than once per MIN_SPACING.
    assert 2 <= wakes.count <= took / wake.MIN_SPACING + 1


async def test_two_files_at_one_path_have_two_sockets(tmp_path: Path) -> None:
    """Containers on one host network each have their own /var/lib/dispatcher/dispatcher.db:
    the same path, different files. Their daemons must not share (or fight over) a
    socket. A file replaced by another at the same path shows the same thing here."""
    database = tmp_path / "d.db"
    database.write_bytes(b"first")
    first_wakes, second_wakes = Wakes(), Wakes()
    first = wake.Listener(database, first_wakes)
    first.start()
    try:
        database.rename(tmp_path / "first.db")  # the first daemon's file, elsewhere now
        database.write_bytes(b"second")  # another file at the same path
        second = wake.Listener(database, second_wakes)
        second.start()  # not "address already in use"
        try:
            wake.send(database)
            await second_wakes.next()
            wake.send(tmp_path / "first.db")
            await first_wakes.next()
            await asyncio.sleep(0.1)
            assert (first_wakes.count, second_wakes.count) == (1, 1)
        finally:
            second.close()
    finally:
        first.close()
