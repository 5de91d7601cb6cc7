"""Fixtures every test folder may use."""

from __future__ import annotations

import compileall
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import postgres

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the package (and the test modules a daemon imports) once, in the
    controller: the suite starts about a thousand Python processes, and where
    PYTHONDONTWRITEBYTECODE is set none of them writes its cache, so each one compiled
    every module it imported again (40 ms of a CLI command's 230 ms of CPU, measured)."""
    if not hasattr(config, "workerinput"):
        for folder in ("dispatcher", "tests"):
            compileall.compile_dir(ROOT / folder, quiet=1)


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
