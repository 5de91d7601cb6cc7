"""The daemon as a real process, driven through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from dispatcher.config import load_settings
from dispatcher.errors import DispatcherError
from dispatcher.store import open_store
from dispatcher.store.base import Access
from tests.helpers import postgres

STEP = Path(__file__).with_name("step.py")
ROOT = Path(__file__).resolve().parents[2]


FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Record:
    kind: str
    label: str
    at: float
    pid: int


def read_records(log: Path) -> list[Record]:
    if not log.exists():
        return []
    records = []
    for line in log.read_text().splitlines():
        kind, label, at, pid = line.split()
        records.append(Record(kind, label, float(at), int(pid)))
    return records


def peak_concurrency(records: list[Record], killed_at: float | None = None) -> int:
    """Most steps running at once, from the steps' own start/end records.

    Starts and ends pair up by pid (one process per execution). A step killed with
    the daemon never writes its end: pass `killed_at`, the moment of the kill (its
    children die with it), to close those.
    """
    ends = {r.pid: r.at for r in records if r.kind == "end"}
    events: list[tuple[float, int]] = []
    for start in (r for r in records if r.kind == "start"):
        end = ends.get(start.pid, killed_at)
        assert end is not None, f"step {start.label} (pid {start.pid}) never ended"
        events += [(start.at, 1), (end, -1)]
    running = peak = 0
    for _, delta in sorted(events):  # an end at the same instant counts before a start
        running += delta
        peak = max(peak, running)
    return peak


class Daemon:
    """`dispatcher run` in a subprocess, its JSON log in a file."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env: dict[str, str] = {}
        """Added to the daemon's environment (not the CLI's), e.g. NOTIFY_SOCKET."""
        self.launcher: list[str] = []
        """Put before the daemon's argv, e.g. a shell that sets WATCHDOG_PID=$$ and execs."""

    def cli(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dispatcher", "--config", str(self.config), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
            env=_env(),
        )

    def query(self, query: str) -> list[tuple[Any, ...]]:
        """Rows read from the database directly (SQLite or PostgreSQL): what a test polls
        while it waits (a CLI process per poll would cost half a second of CPU each; the
        CLI's own answers are asserted where they are the point)."""
        database = tomllib.loads(self.config.read_text()).get("database", {})
        if "url" in database:
            url = database["url"]

            async def read() -> list[Any]:
                con = await asyncpg.connect(url)
                try:
                    return list(await con.fetch(query))
                finally:
                    await con.close()

            return [tuple(row) for row in postgres.run_sync(read)]
        path = self.config.parent / database.get("path", "dispatcher.db")
        if not path.exists():
            return []
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(query).fetchall()

    def statuses(self) -> dict[int, str]:
        """Every dispatch's status, from the database."""
        return dict(self.query("SELECT id, status FROM dispatches"))

    def wait_status(self, dispatch_id: int, *wanted: str, timeout: float = 60) -> None:
        """Wait until the dispatch has one of the `wanted` statuses."""
        wait_until(lambda: self.statuses().get(dispatch_id) in wanted, timeout, interval=0.05)

    def wait_all_final(self, count: int, timeout: float = 60) -> None:
        """Wait until `count` dispatches exist and every one is final."""

        def done() -> bool:
            statuses = self.statuses()
            return len(statuses) == count and all(s in FINAL for s in statuses.values())

        wait_until(done, timeout, interval=0.05)

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def start(self, *, wait: bool = True) -> None:
        """Launch `dispatcher run`; `wait`: until it logs `daemon_started` (several
        daemons start faster side by side: launch each, then wait for each)."""
        self.log_path = self.workdir / f"daemon-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *self.launcher,
                    *(sys.executable, "-m", "dispatcher", "--config", str(self.config), "run"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**_env(), **self.extra_env},
            )
        if wait:
            self.wait_for_event("daemon_started")

    def events(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"event": "(not json)", "line": line})
        return events

    def wait_for_event(self, name: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            assert self.proc is None or self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {name} event within {timeout}s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def init_database(config: Path) -> None:
    """What `dispatcher init` does (open the configured store, creating and migrating
    it, then close it), run in this process: a CLI process per daemon cost a fifth of
    a second of CPU each, for setup that is not what the test is about. The `init`
    command itself is run as a process where it is the point (test_faults, test_openapi).
    A configuration or a database the test means to be refused is left to be refused
    later, by the command or the daemon under test (as the CLI's exit code was ignored)."""
    try:
        settings = load_settings(config, environ=_env())
    except DispatcherError:
        return

    async def create() -> None:
        store = await open_store(settings, access=Access.CREATE)
        await store.close()

    saved = structlog.get_config()
    structlog.configure(processors=[_drop])  # the store's events are for a daemon's log
    try:
        asyncio.run(create())
    except (DispatcherError, OSError):
        pass
    finally:
        structlog.configure(**saved)


def _drop(_logger: object, _name: str, _event: object) -> Any:
    raise structlog.DropEvent


def wait_until(predicate: Any, timeout: float = 60, interval: float = 0.1) -> None:
    """Poll `predicate` until it holds. A slow predicate (one that runs the CLI) is
    polled at most half the time, so waiting does not take a core from the daemon."""
    deadline = time.monotonic() + timeout
    while (started := time.monotonic()) < deadline:
        if predicate():
            return
        time.sleep(max(interval, time.monotonic() - started))
    raise AssertionError("condition not met in time")


_SQLITE_PATH = re.compile(r'^path = "[^"]*dispatcher\.db"$', re.MULTILINE)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Any]:
    """`make(config_text)`: a daemon on that configuration. With DISPATCHER_E2E_PG=1 the
    SQLite `[database] path` is swapped for a fresh PostgreSQL database (opt-in: tests
    of the SQLite-only instance lock and file faults do not apply there)."""
    daemons: list[Daemon] = []
    databases: list[str] = []

    def make(config_text: str, *, init: bool = True) -> Daemon:
        """`init`: create the database first, as an operator does (`dispatcher init`), so
        the CLI can submit before the daemon ever ran."""
        config = tmp_path / "dispatcher.toml"
        if os.environ.get("DISPATCHER_E2E_PG") == "1" and _SQLITE_PATH.search(config_text):
            if not databases:
                postgres.server_or_skip()
                databases.append(postgres.create_database())
            config_text = _SQLITE_PATH.sub(f'url = "{databases[0]}"', config_text)
        config.write_text(config_text)
        daemon = Daemon(config, tmp_path)
        daemons.append(daemon)
        if init:
            init_database(config)
        return daemon

    yield make
    for daemon in daemons:
        daemon.close()
    for url in databases:
        postgres.drop_database(url)
