"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import postgres


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """One PostgreSQL database for the whole session: the store contract suite migrates
    it once and empties its tables before each test."""
    with postgres.new_database() as url:
        yield url


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database of the test's own (a daemon migrates it)."""
    with postgres.new_database() as url:
        yield url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` (real processes, real waits) first, each group in its own
    order: spread over xdist's workers one by one (`--maxschedchunk 1` in scripts/test),
    the long waits then overlap one another and the quick tests fill the end, instead of
    one worker meeting a long test after the others ran dry. Every worker sorts the same
    collection the same way, as xdist requires."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
