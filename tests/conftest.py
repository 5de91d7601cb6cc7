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
