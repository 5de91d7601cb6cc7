"""One cap across hosts even when one freezes or is cut off: leases with fencing.

Several `dispatcher run` processes on one PostgreSQL database. One is frozen (SIGSTOP)
past `instance_ttl`, or cut off from the database by a TCP proxy, while it holds every
place; the others reap its work and run it. What the steps record themselves (start,
a tick every 0.1 s, end) must show:
- never more steps at once than the cap;
- never two runs of one dispatch's step at the same time;
- a step that ran to its end never runs again;
and the frozen daemon, once it resumes, logs `lease_lost`, rejoins as a new instance
and carries on; everything submitted before and after ends `succeeded`.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.helpers.tcpproxy import proxy

from .conftest import Daemon, wait_until

pytestmark = pytest.mark.slow

TICKER = Path(__file__).with_name("ticker.py")
TTL = 3.0
STEP_SECONDS = 8


def config(url: str, log: Path, cap: int, task_cap: int | None = None) -> str:
    step = f'"{sys.executable}", "-S", "{TICKER}", "{log}"'
    per_task = f"concurrency = {task_cap}\n" if task_cap else ""
    return f"""
[database]
url = "{url}"

[daemon]
poll_interval = "200ms"
shutdown_grace = "30s"
kill_grace = "300ms"
heartbeat_interval = "500ms"
instance_ttl = "{TTL}s"

[gate]
global = {cap}

[runners.sh]
type = "exec"

[tasks.nap]
{per_task}steps = [{{ name = "s", runner = "sh", args = [{step}, "{{n}}", "{{secs}}"] }}]
"""


Interval = tuple[float, float]


def runs(log: Path) -> dict[str, list[Interval]]:
    """Each step execution's [start, last record] by label, from the steps' own lines."""
    by_pid: dict[int, list[tuple[str, str, float]]] = defaultdict(list)
    lines = log.read_text().splitlines() if log.exists() else []
    for line in lines:
        kind, label, at, pid = line.split()
        by_pid[int(pid)].append((kind, label, float(at)))
    found: dict[str, list[Interval]] = defaultdict(list)
    for records in by_pid.values():
        label = records[0][1]
        found[label].append((records[0][2], records[-1][2]))
    return found


def completed(log: Path) -> list[str]:
    """Labels of the executions that ran to their end (one entry per execution)."""
    return [line.split()[1] for line in log.read_text().splitlines() if line.startswith("end ")]


def peak(intervals: list[Interval]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = top = 0
    for _, delta in events:  # an end at the same instant counts before a start
        running += delta
        top = max(top, running)
    return top


def submit(daemon: Daemon, labels: list[str], seconds: float) -> None:
    lines = [
        json.dumps({"task": "nap", "params": {"n": label, "secs": str(seconds)}})
        for label in labels
    ]
    result = daemon.cli("submit", "--batch", "-", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr


def all_succeeded(daemon: Daemon, count: int) -> bool:
    statuses = daemon.statuses()
    return len(statuses) == count and all(s == "succeeded" for s in statuses.values())


def check_invariants(log: Path, cap: int) -> dict[str, list[Interval]]:
    executions = runs(log)
    every = [interval for intervals in executions.values() for interval in intervals]
    assert peak(every) <= cap, f"{peak(every)} steps ran at once with a cap of {cap}"
    for label, intervals in executions.items():
        assert peak(intervals) == 1, f"{label} ran twice at the same time: {intervals}"
    ends = completed(log)
    assert len(ends) == len(set(ends)), f"a step that ran to its end ran again: {ends}"
    return executions


def events_of(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]


@pytest.mark.parametrize(
    ("count", "cap"), [(2, 2), (3, 4)], ids=["2-daemons-cap-2", "3-daemons-cap-4"]
)
def test_a_frozen_daemon_never_breaks_the_cap(
    tmp_path: Path, make_daemon: Any, pg_database: str, count: int, cap: int
) -> None:
    log = tmp_path / "steps.log"
    daemons: list[Daemon] = [make_daemon(config(pg_database, log, cap)) for _ in range(count)]
    frozen, others = daemons[0], daemons[1:]
    before = [f"b{n}" for n in range(2 * cap)]
    submit(frozen, before, STEP_SECONDS)
    frozen.start()
    wait_until(lambda: len(runs(log)) >= cap, timeout=60, interval=0.05)  # it holds every place
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)  # early in its steps' lives
    stopped_at, stopped_wall = time.monotonic(), time.time()
    for daemon in others:
        daemon.start()
    time.sleep(max(TTL + 3 - (time.monotonic() - stopped_at), 0))  # the others reap its work
    frozen.proc.send_signal(signal.SIGCONT)

    frozen.wait_for_event("lease_lost", timeout=30)
    frozen.wait_for_event("lease_rejoined", timeout=60)
    after = [f"a{n}" for n in range(cap)]
    submit(frozen, after, 1)
    wait_until(lambda: all_succeeded(frozen, len(before) + len(after)), timeout=180, interval=0.5)

    executions = check_invariants(log, cap)
    assert set(executions) == set(before + after)
    frozen_runs = [i for label in before for i in executions[label] if i[0] < stopped_wall]
    last_tick = max(end for _, end in frozen_runs)
    reruns = [i for label in before for i in executions[label] if i[0] > stopped_wall]
    print(
        f"\nlease figures: {count} daemons, cap {cap}: peak {peak([*frozen_runs, *reruns])}; "
        f"the frozen daemon's steps ended {last_tick - stopped_wall:.2f}s after SIGSTOP "
        f"(self-fence after {TTL - max(1.0, TTL / 5):.1f}s of silence, TTL {TTL:.0f}s); "
        f"first rerun {min(s for s, _ in reruns) - stopped_wall:.2f}s after SIGSTOP"
    )
    for daemon in daemons:
        assert daemon.proc is not None and daemon.proc.poll() is None, "a daemon died"
        assert not events_of(daemon, "daemon_crashed")
    reaped = [  # at another's start (recovery), or by its heartbeat loop
        e.get("dispatches_requeued", 0)
        for d in others
        for e in events_of(d, "dead_instances_reaped") + events_of(d, "daemon_recovered")
    ]
    assert sum(reaped) >= 1, "nobody reaped the frozen daemon's work"
    for daemon in daemons:
        assert daemon.stop() == 0
    assert frozen.cli_json("gates")["rows"]["held"] == 0


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def test_a_daemon_cut_off_from_the_database_ends_its_steps_before_the_ttl(
    tmp_path: Path, make_daemon: Any, pg_database: str
) -> None:
    cap = 2
    log = tmp_path / "steps.log"
    target = urlsplit(pg_database)
    with proxy(target.hostname or "127.0.0.1", target.port or 5432) as cut_off:
        victim = make_daemon(config(_via(pg_database, cut_off.port), log, cap))
        victim.config = victim.config.rename(tmp_path / "victim.toml")  # the other's is next
        before = [f"b{n}" for n in range(2 * cap)]
        submit(victim, before, STEP_SECONDS)
        victim.start()
        wait_until(lambda: len(runs(log)) >= cap, timeout=60, interval=0.05)
        other = make_daemon(config(pg_database, log, cap))
        other.start()
        cut_at = time.time()
        cut_off.cut()
        victim.wait_for_event("lease_expiring", timeout=30)
        time.sleep(TTL + 2)
        cut_off.restore()
        victim.wait_for_event("lease_lost", timeout=60)
        wait_until(lambda: all_succeeded(other, len(before)), timeout=180, interval=0.5)

    executions = check_invariants(log, cap)
    (expiring,) = events_of(victim, "lease_expiring")
    fenced_at = _epoch(expiring["timestamp"])
    assert cut_at < fenced_at < cut_at + TTL  # it ended its steps before the TTL...
    victims_runs = [i for label in before for i in executions[label] if i[0] < cut_at]
    assert all(end < cut_at + TTL for _, end in victims_runs)  # ...and they stopped
    reaped = events_of(other, "dead_instances_reaped")
    assert reaped and min(_epoch(e["timestamp"]) for e in reaped) > max(e for _, e in victims_runs)


def test_per_task_caps_hold_across_three_daemons(
    tmp_path: Path, make_daemon: Any, pg_database: str
) -> None:
    log = tmp_path / "steps.log"
    daemons = [make_daemon(config(pg_database, log, cap=6, task_cap=2)) for _ in range(3)]
    labels = [f"t{n}" for n in range(12)]
    for daemon in daemons:  # all up before the work comes: each competes from the start
        daemon.start()
    submit(daemons[0], labels, 0.5)
    wait_until(lambda: all_succeeded(daemons[0], len(labels)), timeout=180, interval=0.5)
    for daemon in daemons:
        assert daemon.stop() == 0

    executions = check_invariants(log, cap=2)  # the task's cap, not the global one
    assert set(executions) == set(labels)
    starters = {e["instance_id"] for d in daemons for e in events_of(d, "attempt_started")}
    assert len(starters) >= 2  # shared out, not all on one daemon


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
