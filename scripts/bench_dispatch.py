#!/usr/bin/env python3
"""Dispatch-path benchmarks, each side by side with a baseline measured in the same run.

usage: scripts/bench_dispatch.py [--quick] [--rounds R] [--only NAME ...] [--previous TREE]
                                 [--write]

Sections (figures are medians of R rounds, ours and the baseline taking turns within
each round; ratios are ours / baseline):
  drain    N no-op dispatches through the real daemon process (gate.global 16, its log
           lines into a file) against Huey's SqliteHuey with 4 workers draining N
           no-op tasks, with the logging `huey_consumer` sets up by default (INFO into
           a file) and with none (Huey is installed into a throwaway venv under
           var/bench/, never into the project), and
           against the floor: the same rows written by the store's statements through
           sqlite3 alone; with --previous TREE, also against the same drain by the
           code checked out in TREE (e.g. `git worktree add /tmp/prev HEAD~5`)
  latency  submit -> succeeded at low load, CLI and HTTP (p50 / p99)
  exec     the exec runner running /bin/true at concurrency 16 against bare
           asyncio.create_subprocess_exec of /bin/true at the same concurrency
  gate     ConcurrencyGate acquire + release with its mirror row against the same two
           writes with the stdlib sqlite3 module and two commits, and a bare
           asyncio.Semaphore
  idle     an idle daemon: CPU % over the window and RSS

--write puts the table into docs/benchmarks.md (section "Dispatch path").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BENCH_DIR = ROOT / "var" / "bench"


def config_text(db: Path, *, poll: str = "1s", api: str | None = None) -> str:
    api_section = f'[api]\nlisten = "{api}"\n' if api else ""
    return f"""
[database]
path = "{db}"
[daemon]
poll_interval = "{poll}"
[gate]
global = 16
[runners.noop]
type = "noop"
[tasks.n]
steps = [{{ name = "a", runner = "noop" }}]
{api_section}"""


class Daemon:
    """`dispatcher run` as a process on a fresh database in a temporary folder; `tree`:
    the code of another checkout (put first on PYTHONPATH) instead of this one."""

    def __init__(
        self, *, poll: str = "1s", api: str | None = None, tree: Path | None = None
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.db = self.dir / "bench.db"
        self.config = self.dir / "dispatcher.toml"
        self.config.write_text(config_text(self.db, poll=poll, api=api))
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "PYTHONPATH": str(tree or ROOT)}
        # Only `run` and `init` create a database (older trees create it on submit).
        # Run from the temporary folder: `python -m` puts the working directory first on
        # sys.path, which would shadow PYTHONPATH with this checkout's code.
        subprocess.run(
            self._command("init"), env=self.env, cwd=self.dir, capture_output=True, check=False
        )

    def _command(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "dispatcher", "--config", str(self.config), *args]

    def cli(self, *args: str, stdin: bytes | None = None) -> bytes:
        done = subprocess.run(
            self._command(*args),
            input=stdin,
            check=True,
            capture_output=True,
            env=self.env,
            cwd=self.dir,
        )
        return done.stdout

    def start(self) -> None:
        log = (self.dir / "daemon.log").open("wb")
        # In its own folder: `python -m` puts the working folder first on the path, before
        # PYTHONPATH (from the checkout, `--previous` would run this tree's code).
        self.proc = subprocess.Popen(
            self._command("run"), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir
        )
        while b"daemon_started" not in (self.dir / "daemon.log").read_bytes():
            if self.proc.poll() is not None:
                raise SystemExit((self.dir / "daemon.log").read_text())
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)

    def sql(self, query: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.db) as db:
            return db.execute(query).fetchall()


# -- drain ------------------------------------------------------------------------------


def drain_ours(count: int, tree: Path | None = None) -> float:
    daemon = Daemon(poll="200ms", tree=tree)
    lines = "".join(json.dumps({"task": "n", "params": {"i": i}}) + "\n" for i in range(count))
    daemon.cli("submit", "--batch", "-", stdin=lines.encode())
    daemon.start()
    started = time.perf_counter()
    final = "SELECT COUNT(*) FROM dispatches WHERE status IN ('succeeded', 'failed')"
    while daemon.sql(final)[0][0] < count:
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    daemon.stop()
    attempts = daemon.sql("SELECT COUNT(*) FROM attempts")[0][0]
    held = daemon.sql("SELECT COUNT(*) FROM gates WHERE released_at IS NULL")[0][0]
    if attempts != count or held:
        raise SystemExit(f"drain: {attempts} attempts, {held} held gate rows for {count}")
    return count / elapsed


def drain_floor(count: int) -> float:
    """The rows a drain writes, and nothing else: the store's own statements through
    `sqlite3` in one thread (claims of 16 committed alone, then the gate rows, attempt
    rows and final statuses with their plans of those 16, one statement a kind as the
    store sends them, one commit), on the same submitted database. What is left of ours
    above this is Python."""
    sys.path.insert(0, str(ROOT))
    from dispatcher.store.sql import statements
    from dispatcher.store.sqlite.store import rows_statement

    daemon = Daemon()
    lines = "".join(json.dumps({"task": "n", "params": {"i": i}}) + "\n" for i in range(count))
    daemon.cli("submit", "--batch", "-", stdin=lines.encode())
    db = sqlite3.connect(daemon.db, isolation_level=None)
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    sql = statements("dispatcher.store.sqlite")
    claim = sql["claim_many"]
    kinds = ("insert_slot", "insert_attempt", "write_progress")
    plan = json.dumps([{"name": "a", "runner": "noop", "args": []}])
    started = time.perf_counter()
    done = 0
    while done < count:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        db.execute("BEGIN IMMEDIATE")
        ids = [row[0] for row in db.execute(claim, {"instance_id": "floor", "now": now,
               "blocked_gates": "[]", "limit": 16}).fetchall()]  # fmt: skip
        db.execute("COMMIT")
        if not ids:
            raise SystemExit(f"drain floor: {count - done} dispatches could not be claimed")
        rows = {
            "insert_slot": [(i, "global", f"dispatch:{i}", "floor", now, now) for i in ids],
            "insert_attempt": [
                (i, i, 0, "a", "noop", 1, "succeeded", now, now, 0, None, None, "floor", None, 1)
                for i in ids
            ],
            "write_progress": [(i, "floor", plan, 1, "succeeded", True, None, now) for i in ids],
        }
        db.execute("BEGIN IMMEDIATE")
        for kind in kinds:  # one statement a kind, as the store sends them
            text = rows_statement(kind, sql[f"{kind}_rows"], len(ids))
            db.execute(text, [value for row in rows[kind] for value in row])
        db.execute("COMMIT")
        done += len(ids)
    elapsed = time.perf_counter() - started
    db.close()
    return count / elapsed


HUEY_SCRIPT = """
import os, sys, tempfile, threading, time
from huey import SqliteHuey
from huey.consumer import Consumer
from huey.consumer_options import ConsumerConfig
count, logged = int(sys.argv[1]), sys.argv[2] == "logged"
folder = tempfile.mkdtemp()
huey = SqliteHuey(filename=os.path.join(folder, "huey.db"))
if logged:  # what `huey_consumer` sets up by default: INFO, two lines a task
    config = ConsumerConfig(workers=4, worker_type="thread",
                            logfile=os.path.join(folder, "huey.log"))
    config.validate()
    config.setup_logger()
@huey.task()
def noop():
    return None
for _ in range(count):
    noop()
consumer = Consumer(huey, workers=4, worker_type="thread", periodic=False,
                    initial_delay=0.001, max_delay=0.01, check_worker_health=False)
consumer._set_signal_handlers = lambda: None
thread = threading.Thread(target=consumer.run, daemon=True)
started = time.perf_counter()
thread.start()
while huey.pending_count():
    time.sleep(0.01)
print(count / (time.perf_counter() - started))
"""


def huey_python() -> Path:
    venv = BENCH_DIR / "huey-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "huey>=2.5,<4"]
        subprocess.run(pip, check=True)
    return python


def drain_huey(count: int, *, logged: bool) -> float:
    """Huey's consumer draining `count` no-op tasks; `logged`: with the logging its
    `huey_consumer` command sets up by default (INFO into a file: "Executing ..." and
    "... executed in ..." for each task), as ours writes its lines into a file."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    script = BENCH_DIR / "huey_drain.py"
    script.write_text(HUEY_SCRIPT)
    mode = "logged" if logged else "silent"
    result = subprocess.run(
        [str(huey_python()), str(script), str(count), mode],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


# -- latency ----------------------------------------------------------------------------


def latency(samples: int, via: str) -> tuple[float, float]:
    port = free_port()
    daemon = Daemon(api=f"127.0.0.1:{port}" if via == "http" else None)
    daemon.start()
    try:
        for i in range(samples):
            if via == "http":
                body = json.dumps({"task": "n", "params": {"i": i}}).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/dispatches",
                    data=body,
                    method="POST",
                    headers={"Content-Type": "application/json"},
                )
                urllib.request.urlopen(request, timeout=10).read()
            else:
                daemon.cli("submit", "n", "--param", f"i={i}")
            time.sleep(0.05 + (i % 7) * 0.03)  # low load, out of step with the poll
        query = "SELECT COUNT(*) FROM dispatches WHERE status = 'succeeded'"
        while daemon.sql(query)[0][0] < samples:
            time.sleep(0.05)
    finally:
        daemon.stop()
    rows = daemon.sql(
        "SELECT (julianday(finished_at) - julianday(created_at)) * 86400000 FROM dispatches"
    )
    values = sorted(float(row[0]) for row in rows)  # type: ignore[arg-type]
    return percentile(values, 50), percentile(values, 99)


def percentile(values: list[float], pct: float) -> float:
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))
    return values[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- exec -------------------------------------------------------------------------------


async def exec_ours(count: int) -> float:
    from dispatcher.runners.base import RunRequest
    from dispatcher.runners.exec import ExecRunner

    runner = ExecRunner("bench", kill_grace=1.0)
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with limit:
            request = RunRequest(
                dispatch_id=i, step="t", attempt=1, args=("/bin/true",), timeout=30
            )
            outcome = await runner.run(request)
            assert outcome.ok, outcome

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return count / (time.perf_counter() - started)


async def exec_bare(count: int) -> float:
    limit = asyncio.Semaphore(16)

    async def one() -> None:
        async with limit:
            proc = await asyncio.create_subprocess_exec(
                "/bin/true", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            await proc.communicate()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count / (time.perf_counter() - started)


# -- gate -------------------------------------------------------------------------------


async def gate_ours(count: int) -> float:
    from dispatcher.clock import SystemClock
    from dispatcher.gate import ConcurrencyGate
    from dispatcher.store.sqlite import SQLiteStore

    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    store = await SQLiteStore.open(folder / "gate.db")
    gate = ConcurrencyGate(store, SystemClock(), "bench", {"global": 16})
    started = time.perf_counter()
    for i in range(count):
        slot = await gate.acquire("global", f"dispatch:{i}")
        await gate.release(slot)
    await store.gate_row_counts()  # waits until every queued mirror row is committed
    elapsed = time.perf_counter() - started
    counts = await store.gate_row_counts()
    await store.close()
    assert counts.released == count and counts.held == 0, counts
    return count / elapsed


def gate_sqlite3(count: int) -> float:
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    db = sqlite3.connect(folder / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(
        "CREATE TABLE gates (id INTEGER PRIMARY KEY AUTOINCREMENT, gate TEXT, holder TEXT,"
        " acquired_at TEXT, released_at TEXT)"
    )
    started = time.perf_counter()
    for i in range(count):
        db.execute("BEGIN")
        row_id = db.execute(
            "INSERT INTO gates (gate, holder, acquired_at) VALUES ('global', ?, ?)",
            (f"dispatch:{i}", "2026-11-29T00:00:00.000000Z"),
        ).lastrowid
        db.execute("COMMIT")
        db.execute("BEGIN")
        db.execute(
            "UPDATE gates SET released_at = ? WHERE id = ? AND released_at IS NULL",
            ("2026-11-29T00:00:01.000000Z", row_id),
        )
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return count / elapsed


async def gate_semaphore(count: int) -> float:
    sem = asyncio.Semaphore(16)
    started = time.perf_counter()
    for _ in range(count):
        await sem.acquire()
        sem.release()
    return count / (time.perf_counter() - started)


# -- idle -------------------------------------------------------------------------------


def idle(window: float) -> tuple[float, float]:
    daemon = Daemon()
    daemon.start()
    assert daemon.proc is not None
    try:
        time.sleep(2)
        tick = os.sysconf("SC_CLK_TCK")
        before, t0 = cpu_ticks(daemon.proc.pid), time.perf_counter()
        time.sleep(window)
        after, t1 = cpu_ticks(daemon.proc.pid), time.perf_counter()
        rss_kb = rss(daemon.proc.pid)
    finally:
        daemon.stop()
    return 100 * (after - before) / tick / (t1 - t0), rss_kb / 1024


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    return 0.0


# -- running ----------------------------------------------------------------------------


def medians_of(rounds: int, *measures: Callable[[], float]) -> list[float]:
    """Median of each measure over `rounds` rounds, the measures taking turns within a
    round: a change in the machine's load then falls on all of them, not on one."""
    results: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for values, measure in zip(results, measures, strict=True):
            values.append(measure())
    return [statistics.median(values) for values in results]


def run_sections(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    quick = args.quick
    rounds = args.rounds
    rows: list[tuple[str, str, str, str]] = []
    want = set(args.only or ["drain", "latency", "exec", "gate", "idle"])
    if "drain" in want:
        count = 5000 if quick else 20000
        previous = Path(args.previous).resolve() if args.previous else None
        measures = [
            lambda: drain_ours(count),
            lambda: drain_huey(count, logged=True),
            lambda: drain_huey(count, logged=False),
            lambda: drain_floor(count),
        ]
        if previous is not None:
            measures.append(lambda: drain_ours(count, tree=previous))
        ours, huey, silent, floor, *before = medians_of(rounds, *measures)
        rows.append(
            (
                f"drain {count} no-op dispatches",
                f"{ours:,.0f}/s",
                f"Huey SqliteHuey, 4 workers, logging as huey_consumer: {huey:,.0f}/s",
                f"{ours / huey:.2f}x",
            )
        )
        rows.append(("", "", f"Huey, the same with no logging: {silent:,.0f}/s",
                     f"{ours / silent:.2f}x"))  # fmt: skip
        rows.append(("", "", f"floor: the same rows by sqlite3 alone: {floor:,.0f}/s",
                     f"{ours / floor:.2f}x"))  # fmt: skip
        if before:
            label = f"previous code ({_commit(previous)}): {before[0]:,.0f}/s"
            rows.append(("", "", label, f"{ours / before[0]:.2f}x"))
    if "latency" in want:
        samples = 20 if quick else 60
        for via in ("cli", "http"):
            p50, p99 = latency(samples, via)
            rows.append(
                (
                    f"latency submit->succeeded, {via}",
                    f"p50 {p50:.0f} ms, p99 {p99:.0f} ms",
                    "target p99 < 1,050 ms" if via == "cli" else "target p99 < 20 ms",
                    "-",
                )
            )
    if "exec" in want:
        count = 500 if quick else 2000
        ours, bare = medians_of(
            rounds, lambda: asyncio.run(exec_ours(count)), lambda: asyncio.run(exec_bare(count))
        )
        rows.append(
            (
                f"exec /bin/true x{count}, concurrency 16",
                f"{ours:,.0f}/s",
                f"bare create_subprocess_exec: {bare:,.0f}/s",
                f"{ours / bare:.2f}x",
            )
        )
    if "gate" in want:
        count = 5000 if quick else 20000
        ours, raw, sem = medians_of(
            rounds,
            lambda: asyncio.run(gate_ours(count)),
            lambda: gate_sqlite3(count),
            lambda: asyncio.run(gate_semaphore(count)),
        )
        rows.append(
            (
                "gate acquire+release with mirror row",
                f"{ours:,.0f}/s",
                f"sqlite3, two commits: {raw:,.0f}/s",
                f"{ours / raw:.2f}x",
            )
        )
        rows.append(("", "", f"bare asyncio.Semaphore: {sem:,.0f}/s", f"{ours / sem:.3f}x"))
    if "idle" in want:
        cpu, rss_mb = idle(10 if quick else 60)
        rows.append(
            (
                f"idle daemon, {10 if quick else 60} s",
                f"CPU {cpu:.2f} %, RSS {rss_mb:.0f} MB",
                "target CPU < 1 %, RSS < 60 MB",
                "-",
            )
        )
    return rows


def _commit(tree: Path | None) -> str:
    if tree is None:
        return "?"
    done = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True
    )
    return done.stdout.strip() or str(tree)


def table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| measure | dispatcher | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = cpu
    return (
        f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, shorter windows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=["drain", "latency", "exec", "gate", "idle"])
    parser.add_argument(
        "--previous", metavar="TREE", help="drain: also run the code of this checkout"
    )
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    rows = run_sections(args)
    text = table(rows)
    print(text)
    if args.write:
        write_doc(text, args)
    return 0


def write_doc(text: str, args: argparse.Namespace) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    command = (
        "scripts/bench_dispatch.py"
        + (" --quick" if args.quick else "")
        + (f" --rounds {args.rounds}" if args.rounds != 3 else "")
        + (f" --previous {args.previous}" if args.previous else "")
        + " --write"
    )
    section = (
        f"## Dispatch path\n\nMachine: {machine()}.\nCommand: `{command}` "
        f"({time.strftime('%Y-%m-%d', time.gmtime())}); medians of {args.rounds} "
        f"rounds.\n\n{text}\n"
    )
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = old.find("## Dispatch path")
    if start >= 0:
        end = old.find("\n## ", start + 1)
        old = old[:start] + old[end + 1 :] if end >= 0 else old[:start]
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(old.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    sys.exit(main())
