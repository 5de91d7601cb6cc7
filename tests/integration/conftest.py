"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dispatcher.store.sqlite import SQLiteStore


@pytest.fixture
def stray_pids() -> Iterator[list[int]]:
    """Pids a test may leave behind on failure; killed at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """A new SQLite store on a file of its own, closed (queued writes written) after."""
    opened = await SQLiteStore.open(tmp_path / "dispatcher.db")
    try:
        yield opened
    finally:
        await opened.close()
