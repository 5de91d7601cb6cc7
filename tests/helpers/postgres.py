"""The machine's PostgreSQL for tests: started if it is down, a fresh database per use.

`DISPATCHER_TEST_PG` overrides the server URL (default: the local server, trust auth).
Where no server can be had, tests that need one are skipped with a loud reason.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

SERVER = os.environ.get("DISPATCHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TABLES = "dispatches, attempts, gates, instances, schedules"


T = TypeVar("T")


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on its own loop in another thread (so this works
    from sync and async fixtures alike)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def _url(database: str) -> str:
    return SERVER.rsplit("/", 1)[0] + "/" + database


async def _ping() -> str | None:
    try:
        con = await asyncpg.connect(SERVER, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    await con.close()
    return None


def _start_local_server() -> None:
    clusters = Path("/etc/postgresql")
    if not clusters.is_dir():
        return
    # Not with this process's orphan-guard token (an in-process daemon put it into
    # os.environ): the server would be killed with this test process's steps.
    env = {key: value for key, value in os.environ.items() if key != "DISPATCHER_GUARD"}
    for version in sorted(p.name for p in clusters.iterdir()):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            check=False,
            capture_output=True,
            timeout=60,
            env=env,
        )


def server_or_skip() -> None:
    """Make sure a server answers (starting the local one); else skip, loudly."""
    if run_sync(_ping) is None:
        return
    _start_local_server()
    reason = run_sync(_ping)
    if reason is not None:
        pytest.skip(f"NO POSTGRESQL SERVER at {SERVER} ({reason}): PostgreSQL tests SKIPPED")


async def _admin(sql: str) -> None:
    con = await asyncpg.connect(SERVER)
    try:
        await con.execute(sql)
    finally:
        await con.close()


def create_database() -> str:
    """A new empty database with a unique name; answers its URL."""
    name = f"dispatcher_test_{uuid.uuid4().hex[:10]}"
    run_sync(lambda: _admin(f'CREATE DATABASE "{name}"'))
    return _url(name)


def drop_database(url: str) -> None:
    """Drop a database made by `create_database` (its connections are ended)."""
    name = url.rsplit("/", 1)[1]
    run_sync(lambda: _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def new_database() -> Iterator[str]:
    """A new empty database's URL (the test is skipped when no server can be had),
    dropped at the end. The `pg_url` and `pg_database` fixtures (tests/conftest.py)
    are made of it."""
    server_or_skip()
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


async def truncate(url: str) -> None:
    """Empty every table (ids restart), keeping the schema."""
    con = await asyncpg.connect(url)
    try:
        await con.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await con.close()
