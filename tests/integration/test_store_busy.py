"""A busy database: waited out within `busy_patience`, `StoreBusy` (exit 75) only after.

SQLite's own busy handler waits `busy_timeout` for a lock, but it is not called in
every case (a journal-mode change, WAL recovery, a lock upgrade). The store retries
such a statement itself; these tests hold real locks from other connections and
processes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher.errors import EX_TEMPFAIL, StoreBusy
from dispatcher.models import NewDispatch
from dispatcher.store.sqlite import SQLiteStore

NOW = datetime(2026, 11, 29, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def write_locked(path: Path, seconds: float) -> Iterator[threading.Event]:
    """Another connection holds the write lock (`BEGIN EXCLUSIVE`) for `seconds`."""
    locked = threading.Event()

    def hold() -> None:
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            db.execute("ROLLBACK")

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        locked.wait(10)
        yield locked
    finally:
        thread.join()


async def test_a_lock_longer_than_busy_timeout_is_waited_out_within_patience(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    store = await SQLiteStore.open(path, busy_timeout_ms=50, busy_patience=30)
    try:
        with capture_logs() as logged, write_locked(path, 0.5):
            answer = await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)
            single = await store.open_slot("global", "h", "i", NOW)
    finally:
        await store.close()

    assert answer.created and single > 0
    events = [entry["event"] for entry in logged]
    assert "database_busy" in events and "database_free" in events


async def test_past_patience_it_is_store_busy_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await SQLiteStore.open(path, busy_timeout_ms=50, busy_patience=0.2)
    try:
        with write_locked(path, 1.0), pytest.raises(StoreBusy) as caught:
            await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)
        # The same connection works once the lock is gone.
        assert (await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)).created
    finally:
        await store.close()
    assert caught.value.exit_code == EX_TEMPFAIL
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


async def test_a_busy_error_the_busy_handler_never_saw_is_retried(tmp_path: Path) -> None:
    """With no busy timeout SQLite answers busy at once, as it does where its busy
    handler is never called (WAL recovery, a lock upgrade): the writer retries."""
    path = tmp_path / "db.sqlite"
    store = await SQLiteStore.open(path, busy_timeout_ms=0, busy_patience=30)
    try:
        with write_locked(path, 0.3):
            reserved = await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)
            slot = await store.open_slot("global", "h", "i", NOW)
    finally:
        await store.close()
    assert reserved.created and slot > 0


SUBMITTER = """
import contextlib, io, json, sys
from dispatcher.cli import main

config, worker, count, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(count):
    k = (i * 7 + worker) % keys
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--config", config, "submit", "t", "--param", f"n={k}", "--key", f"k{k}",
                     "--json"])
    answer = json.loads(out.getvalue()) if code == 0 else None
    print(json.dumps({"key": f"k{k}", "code": code, "answer": answer, "stderr": err.getvalue()}))
"""


@pytest.mark.slow
def test_many_processes_submitting_the_same_keys_make_one_dispatch_each(tmp_path: Path) -> None:
    """16 processes x 50 CLI submits of 40 overlapping keys, on a database that four
    `dispatcher init` started together have just created."""
    config = tmp_path / "dispatcher.toml"
    config.write_text(
        '[database]\npath = "state/dispatcher.db"\n\n[runners.noop]\ntype = "noop"\n\n'
        '[tasks.t]\nsteps = [{ name = "s", runner = "noop", args = ["{n}"] }]\n'
    )
    init = [sys.executable, "-m", "dispatcher", "--config", str(config), "init"]
    starters = [subprocess.Popen(init, cwd=ROOT) for _ in range(4)]
    assert [p.wait(60) for p in starters] == [0, 0, 0, 0]
    script = tmp_path / "submitter.py"
    script.write_text(SUBMITTER)
    workers, count, keys = 16, 50, 40
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(config), str(worker), str(count), str(keys)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for worker in range(workers)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err
        results += [json.loads(line) for line in out.splitlines()]

    assert len(results) == workers * count
    failed = [r for r in results if r["code"] != 0]
    assert failed == [], failed[:3]
    ids_by_key: dict[str, set[int]] = {}
    for result in results:
        ids_by_key.setdefault(result["key"], set()).add(result["answer"]["id"])
    assert all(len(ids) == 1 for ids in ids_by_key.values())
    assert sum(r["answer"]["created"] for r in results) == keys
    with closing(sqlite3.connect(tmp_path / "state" / "dispatcher.db")) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM dispatches").fetchone() == (
            keys,
            keys,
        )
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_two_stores_racing_through_a_lock_lose_nothing(tmp_path: Path) -> None:
    """Two connections reserving the same keys while a third holds the lock at times."""
    path = tmp_path / "db.sqlite"
    one = await SQLiteStore.open(path, busy_timeout_ms=20, busy_patience=30)
    two = await SQLiteStore.open(path, busy_timeout_ms=20, busy_patience=30)
    news = [NewDispatch(task="t", params={"n": n}, key=f"k{n}") for n in range(30)]
    try:
        with write_locked(path, 0.3):
            answers = await asyncio.gather(
                *(store.check_and_reserve(new, NOW) for new in news for store in (one, two))
            )
    finally:
        await one.close()
        await two.close()
    assert sum(answer.created for answer in answers) == 30
    assert len({answer.id for answer in answers}) == 30
