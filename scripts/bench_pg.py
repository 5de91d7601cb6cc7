#!/usr/bin/env python3
"""PostgreSQL benchmarks: the daemon's drain on a shared database, against procrastinate.

usage: scripts/bench_pg.py [--count N] [--rounds R] [--quick] [--no-exec] [--url URL]
                           [--previous TREE] [--write]
       (also `scripts/bench pg ...`)

Each round runs, in turn on the same machine, each on a new database:
  ours-1   one `dispatcher run` process, `gate.global = 16`, one no-op step per dispatch
  ours-3   three `dispatcher run` processes on one database, `gate.global = 16` in all
  peer     procrastinate (PostgreSQL, psycopg) with one worker of concurrency 16 and a
           no-op async task; installed into a throwaway venv under var/bench/, never
           into the project
  sqlite   the same drain by one daemon on SQLite (the pipeline without PostgreSQL)
  exec-pg  one daemon draining N/4 dispatches of one `exec` step (/bin/true)
  exec-sqlite  the same exec drain on SQLite
  exec-bare  asyncio.create_subprocess_exec of /bin/true, N/4 times, 16 at once
  before-1, before-3  with --previous TREE: ours-1 and ours-3 by the code checked out in
           TREE (e.g. `git worktree add /tmp/prev HEAD~5`)

For each drain the workers are started first and idle; then the N jobs are inserted in
one transaction (their NOTIFY wakes the workers), and the clock runs from the moment
that commit returns until every job is final (the driver polls a count every 10 ms).
Daemon CPU is the user+system time of the worker processes over the same window,
divided by N. For our drains the PostgreSQL server's CPU (every `postgres` process,
with the backends that exited) and the share of the machine's CPU time in use are
taken over the window too: with the daemon's CPU they give the most dispatches a
second these cores could drain at that cost, whatever the number of daemons.
Figures are medians of R rounds; ratios are computed from the medians.

--write puts the table into docs/benchmarks.md (section "PostgreSQL").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
BENCH_DIR = ROOT / "var" / "bench"
PYTHON = sys.executable
SERVER = os.environ.get("DISPATCHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
CONCURRENCY = 16

import asyncpg  # noqa: E402 - after the path is set
from bench_dispatch import _commit, cpu_ticks, exec_bare, machine  # noqa: E402

# -- databases ----------------------------------------------------------------------------


def _url(server: str, database: str) -> str:
    return server.rsplit("/", 1)[0] + "/" + database


async def _admin(server: str, sql: str) -> None:
    con = await asyncpg.connect(server)
    try:
        await con.execute(sql)
    finally:
        await con.close()


class Database:
    """A new database on the server, dropped at the end."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.name = f"dispatcher_bench_{uuid.uuid4().hex[:10]}"
        self.url = _url(server, self.name)

    def __enter__(self) -> Database:
        asyncio.run(_admin(self.server, f'CREATE DATABASE "{self.name}"'))
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run(_admin(self.server, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))


async def _count(url: str, query: str, target: int, poll: float = 0.01) -> float:
    """Poll `query` (a count) until it reaches `target`; the monotonic time it did."""
    con = await asyncpg.connect(url)
    try:
        while True:
            if await con.fetchval(query) >= target:
                return time.perf_counter()
            await asyncio.sleep(poll)
    finally:
        await con.close()


# -- what the machine spends ----------------------------------------------------------------


def server_ticks() -> int:
    """CPU ticks of the PostgreSQL server so far: every `postgres` process, with the
    children the postmaster has reaped (backends of connections that closed)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += sum(int(field) for field in fields[11:15])  # utime stime cutime cstime
    return total


def machine_jiffies() -> tuple[int, int]:
    """(busy, all) CPU time of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


# -- ours ------------------------------------------------------------------------------


def config_text(database: str) -> str:
    """`database`: `url = "postgresql://..."` or `path = "..."` (SQLite)."""
    return f"""
[database]
{database}
[daemon]
poll_interval = "1s"
[gate]
global = {CONCURRENCY}
[runners.noop]
type = "noop"
[runners.shell]
type = "exec"
[tasks.n]
steps = [{{ name = "a", runner = "noop" }}]
[tasks.x]
steps = [{{ name = "a", runner = "shell", args = ["/bin/true"] }}]
[log]
level = "{os.environ.get("BENCH_LOG_LEVEL", "info")}"
"""


def _start_daemons(
    config: Path, folder: Path, daemons: int, tree: Path | None = None
) -> list[subprocess.Popen[bytes]]:
    command = [PYTHON, "-m", "dispatcher", "--config", str(config), "run"]
    env = {**os.environ, "PYTHONPATH": str(tree or ROOT)}
    procs, logs = [], []
    for n in range(daemons):
        log = folder / f"daemon-{n}.log"
        logs.append(log)
        with log.open("wb") as out:
            # In the run's folder: `python -m` puts the working folder first on the path,
            # before PYTHONPATH (from the checkout, it would run this tree's code).
            procs.append(
                subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
            )
    for proc, log in zip(procs, logs, strict=True):
        while b"daemon_started" not in log.read_bytes():
            if proc.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.01)
    return procs


async def _submit(url: str, task: str, count: int) -> None:
    """Every dispatch in one transaction, through the store (its NOTIFY at the commit)."""
    from dispatcher.models import NewDispatch
    from dispatcher.store.postgres import PostgresStore

    store = await PostgresStore.open(url)
    try:
        news = [NewDispatch(task=task, params={"i": i}) for i in range(count)]
        await store.reserve_many(news, datetime.now(UTC))
    finally:
        await store.close()


SUBMIT = """
import asyncio, sys
from datetime import UTC, datetime
from dispatcher.models import NewDispatch
from dispatcher.store.postgres import PostgresStore

async def main(url, task, count):
    store = await PostgresStore.open(url)
    try:
        news = [NewDispatch(task=task, params={"i": i}) for i in range(count)]
        await store.reserve_many(news, datetime.now(UTC))
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _submit_with(tree: Path, url: str, task: str, count: int) -> None:
    """`_submit` by the code of another checkout (its own schema version)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [PYTHON, "-c", SUBMIT, url, task, str(count)]
    subprocess.run(command, env=env, check=True, cwd=tempfile.gettempdir())


def drain_ours(
    server: str, count: int, daemons: int, task: str = "n", tree: Path | None = None
) -> tuple[float, float, float, float]:
    """(dispatches a second, daemon CPU ms a dispatch, PostgreSQL server CPU ms a
    dispatch, share of the machine's CPU in use); `tree`: the code of another checkout
    instead of this one."""
    folder = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    with Database(server) as db:
        config = folder / "dispatcher.toml"
        config.write_text(config_text(f'url = "{db.url}"'))
        if tree is not None:  # its schema first: this tree's would be newer than it knows
            _submit_with(tree, db.url, task, 0)
        procs = _start_daemons(config, folder, daemons, tree)
        try:
            before = sum(cpu_ticks(p.pid) for p in procs)
            if tree is None:
                asyncio.run(_submit(db.url, task, count))
            else:
                _submit_with(tree, db.url, task, count)
            # The clock starts at the commit (the daemons wake on its NOTIFY), as for
            # procrastinate, whose jobs are deferred in one statement.
            started = time.perf_counter()
            server_before, machine_before = server_ticks(), machine_jiffies()
            final = "SELECT COUNT(*) FROM dispatches WHERE status IN ('succeeded', 'failed')"
            ended = asyncio.run(_count(db.url, final, count))
            after = sum(cpu_ticks(p.pid) for p in procs)
            server_after, machine_after = server_ticks(), machine_jiffies()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(60)
        failed = asyncio.run(
            _fetchval(db.url, "SELECT COUNT(*) FROM dispatches WHERE status <> 'succeeded'")
        )
        held = asyncio.run(
            _fetchval(db.url, "SELECT COUNT(*) FROM gates WHERE released_at IS NULL")
        )
        if failed or held:
            raise SystemExit(f"drain: {failed} not succeeded, {held} held gate rows ({folder})")
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    cpu_ms = (after - before) * tick_ms / count
    server_ms = (server_after - server_before) * tick_ms / count
    busy = (machine_after[0] - machine_before[0]) / max(machine_after[1] - machine_before[1], 1)
    return count / (ended - started), cpu_ms, server_ms, busy


def drain_sqlite(count: int, task: str = "n") -> tuple[float, float]:
    """The same drain by one daemon on SQLite: what the pipeline costs without
    PostgreSQL, on the machine as loaded as it is in this round."""
    from dispatcher.models import NewDispatch
    from dispatcher.store.sqlite import SQLiteStore

    folder = Path(tempfile.mkdtemp(prefix="bench-sqlite-"))
    config = folder / "dispatcher.toml"
    config.write_text(config_text(f'path = "{folder / "bench.db"}"'))
    (proc,) = _start_daemons(config, folder, 1)

    async def submit() -> None:
        store = await SQLiteStore.open(folder / "bench.db")
        try:
            news = [NewDispatch(task=task, params={"i": i}) for i in range(count)]
            await store.reserve_many(news, datetime.now(UTC))  # one transaction, one wake-up
        finally:
            await store.close()

    def final() -> int:
        with sqlite3.connect(folder / "bench.db") as db:
            query = "SELECT COUNT(*) FROM dispatches WHERE status IN ('succeeded', 'failed')"
            return int(db.execute(query).fetchone()[0])

    try:
        before = cpu_ticks(proc.pid)
        asyncio.run(submit())
        started = time.perf_counter()
        while final() < count:
            time.sleep(0.01)
        ended = time.perf_counter()
        after = cpu_ticks(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    cpu_ms = (after - before) / os.sysconf("SC_CLK_TCK") * 1000 / count
    return count / (ended - started), cpu_ms


async def _fetchval(url: str, query: str) -> int:
    con = await asyncpg.connect(url)
    try:
        return int(await con.fetchval(query))
    finally:
        await con.close()


# -- procrastinate -------------------------------------------------------------------------

PEER_SCRIPT = """
import asyncio, sys
import procrastinate

url, count, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

@app.task(name="noop")
async def noop(i):
    return None

async def main():
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        worker = asyncio.create_task(app.run_worker_async(
            concurrency=concurrency, wait=True, install_signal_handlers=False,
            listen_notify=True, delete_jobs="never"))
        await asyncio.sleep(1.0)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await noop.batch_defer_async(*({"i": i} for i in range(count)))
        print("deferred", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        worker.cancel()

asyncio.run(main())
"""


def peer_python() -> Path:
    venv = BENCH_DIR / "procrastinate-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "procrastinate>=3.10,<4", "psycopg[binary]>=3.1,<4"], check=True)
    return python


def peer_version() -> str:
    done = subprocess.run(
        [
            str(peer_python()),
            "-c",
            "import importlib.metadata as m; print(m.version('procrastinate'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "?"


def drain_peer(server: str, count: int) -> tuple[float, float]:
    script = BENCH_DIR / "procrastinate_drain.py"
    script.write_text(PEER_SCRIPT)
    with Database(server) as db:
        proc = subprocess.Popen(
            [str(peer_python()), str(script), db.url, str(count), str(CONCURRENCY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("procrastinate did not start")
            before = cpu_ticks(proc.pid)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            if proc.stdout.readline().strip() != "deferred":
                raise SystemExit("procrastinate did not defer")
            started = time.perf_counter()
            final = "SELECT COUNT(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
            ended = asyncio.run(_count(db.url, final, count))
            after = cpu_ticks(proc.pid)
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    cpu_ms = (after - before) / os.sysconf("SC_CLK_TCK") * 1000 / count
    return count / (ended - started), cpu_ms


# -- running --------------------------------------------------------------------------------

Measure = Callable[[], tuple[float, ...]]
"""(dispatches a second, CPU ms a dispatch, and for our PostgreSQL drains the server's
CPU ms a dispatch and the machine's busy share)."""


def medians_of(rounds: int, measures: dict[str, Measure]) -> dict[str, tuple[float, ...]]:
    """Median of each figure of each measure over `rounds` rounds, the measures taking
    turns within a round: a change in the machine's load then falls on all of them,
    not on one."""
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in measures}
    for n in range(rounds):
        for name, measure in measures.items():
            value = measure()
            results[name].append(value)
            print(
                f"round {n + 1} {name}: {value[0]:,.0f}/s, {value[1]:.2f} ms CPU", file=sys.stderr
            )
    return {
        name: tuple(statistics.median(figures) for figures in zip(*values, strict=True))
        for name, values in results.items()
    }


def run(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    count = args.count
    server = args.url
    exec_count = max(count // 4, 100)
    measures: dict[str, Measure] = {
        "ours-1": lambda: drain_ours(server, count, 1),
        "peer": lambda: drain_peer(server, count),
        "ours-3": lambda: drain_ours(server, count, 3),
        "sqlite": lambda: drain_sqlite(count),
    }
    previous = Path(args.previous).resolve() if args.previous else None
    if previous is not None:
        measures["before-1"] = lambda: drain_ours(server, count, 1, tree=previous)
        measures["before-3"] = lambda: drain_ours(server, count, 3, tree=previous)
    if not args.no_exec:
        measures["exec-pg"] = lambda: drain_ours(server, exec_count, 1, task="x")
        measures["exec-sqlite"] = lambda: drain_sqlite(exec_count, task="x")
        measures["exec-bare"] = lambda: (asyncio.run(exec_bare(exec_count)), 0.0)
    m = medians_of(args.rounds, measures)
    one, three, peer, lite = m["ours-1"], m["ours-3"], m["peer"], m["sqlite"]
    version = peer_version()
    cores = os.cpu_count() or 1
    ceiling = cores * 1000 / (one[1] + one[2])
    rows = [
        (
            f"drain {count} no-op dispatches, 16 in flight, 1 daemon",
            f"{one[0]:,.0f}/s",
            f"procrastinate {version}, 1 worker, concurrency 16: {peer[0]:,.0f}/s",
            f"{one[0] / peer[0]:.2f}x",
        ),
        (
            "the same, 3 daemons on one database",
            f"{three[0]:,.0f}/s",
            f"1 daemon: {one[0]:,.0f}/s",
            f"{three[0] / one[0]:.2f}x",
        ),
        (
            "daemon CPU per dispatch, 1 daemon / 3 daemons",
            f"{one[1]:.2f} ms / {three[1]:.2f} ms",
            f"procrastinate worker: {peer[1]:.2f} ms",
            f"{one[1] / peer[1]:.2f}x" if peer[1] else "-",
        ),
        (
            "PostgreSQL server CPU per dispatch, 1 daemon / 3 daemons",
            f"{one[2]:.2f} ms / {three[2]:.2f} ms",
            f"machine's CPU in use during the drain: {one[3]:.0%} / {three[3]:.0%}",
            "-",
        ),
        (
            f"most any number of daemons could drain on these {cores} CPUs at one daemon's "
            "cost a dispatch (CPUs ÷ (daemon + server CPU a dispatch))",
            f"{ceiling:,.0f}/s",
            f"1 daemon: {one[0]:,.0f}/s",
            f"{ceiling / one[0]:.2f}x",
        ),
        (
            "the same drain, 1 daemon on SQLite (what the pipeline costs without PostgreSQL)",
            f"{lite[0]:,.0f}/s, {lite[1]:.2f} ms CPU",
            f"1 daemon on PostgreSQL: {one[1]:.2f} ms CPU",
            f"{one[1] / lite[1]:.2f}x" if lite[1] else "-",
        ),
    ]
    if previous is not None:
        b1, b3 = m["before-1"], m["before-3"]
        label = f"previous code ({_commit(previous)})"
        rows.append(
            (
                "",
                "",
                f"{label}, 1 daemon: {b1[0]:,.0f}/s, {b1[1]:.2f} ms CPU",
                f"{one[0] / b1[0]:.2f}x",
            )
        )
        rows.append(
            (
                "",
                "",
                f"{label}, 3 daemons: {b3[0]:,.0f}/s, {b3[1]:.2f} ms CPU",
                f"{three[0] / b3[0]:.2f}x",
            )
        )
    if not args.no_exec:
        ex, ex_lite, bare = m["exec-pg"], m["exec-sqlite"], m["exec-bare"]
        rows.append(
            (
                f"exec /bin/true x{exec_count} through 1 daemon on PostgreSQL, 16 in flight",
                f"{ex[0]:,.0f}/s, {ex[1]:.2f} ms CPU",
                f"bare create_subprocess_exec, 16 at once: {bare[0]:,.0f}/s",
                f"{ex[0] / bare[0]:.2f}x",
            )
        )
        rows.append(
            (
                "",
                "",
                f"the same exec drain on SQLite: {ex_lite[0]:,.0f}/s, {ex_lite[1]:.2f} ms CPU",
                f"{ex[0] / ex_lite[0]:.2f}x",
            )
        )
    return rows


def table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| measure | dispatcher | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def server_version(server: str) -> str:
    return asyncio.run(_fetchval_text(server, "SHOW server_version"))


async def _fetchval_text(url: str, query: str) -> str:
    con = await asyncpg.connect(url)
    try:
        return str(await con.fetchval(query))
    finally:
        await con.close()


END_OF_TABLE = "<!-- end of the table written by scripts/bench pg --write -->"


def write_doc(text: str, args: argparse.Namespace) -> None:
    """Put the table at the top of the section "PostgreSQL" of docs/benchmarks.md (made
    if missing); the prose after `END_OF_TABLE` stays."""
    doc = ROOT / "docs" / "benchmarks.md"
    command = f"scripts/bench pg --count {args.count} --rounds {args.rounds}"
    command += (" --previous TREE" if args.previous else "") + " --write"
    table_part = (
        f"## PostgreSQL\n\nMachine: {machine()}, PostgreSQL {server_version(args.url)} on the "
        f"same host.\nCommand: `{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}); "
        f"medians of {args.rounds} rounds.\n\n{text}\n\n{END_OF_TABLE}\n"
    )
    old = doc.read_text()
    start = old.find("## PostgreSQL")
    if start < 0:
        doc.write_text(old.rstrip() + "\n\n" + table_part)
        return
    end = old.find(END_OF_TABLE, start)
    if end >= 0:
        end += len(END_OF_TABLE) + 1
    else:
        end = old.find("\n## ", start + 1)
        end = len(old) if end < 0 else end + 1
    doc.write_text(old[:start] + table_part + old[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000, help="dispatches per drain (≥ 3000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="--count 3000 --rounds 1")
    parser.add_argument("--no-exec", action="store_true", help="skip the exec rows")
    parser.add_argument(
        "--previous", metavar="TREE", help="also drain with the code of this checkout"
    )
    parser.add_argument("--url", default=SERVER, help="a server where databases can be made")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    if args.quick:
        args.count, args.rounds = 3000, 1
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    text = table(run(args))
    print(text)
    if args.write:
        write_doc(text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
