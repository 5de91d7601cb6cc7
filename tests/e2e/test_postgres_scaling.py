"""Several daemons on one PostgreSQL database share the queue and the caps (issue 8).

Three `dispatcher run` processes, `gate.global = 4`, a few hundred dispatches: the
steps' own timestamps must never show more than 4 running at once across all three,
every dispatch must complete exactly once, and a daemon killed with SIGKILL mid-run
must lose nothing: a live daemon reaps its slots and requeues its work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import FINAL, STEP, peak_concurrency, read_records, wait_until

pytestmark = pytest.mark.slow

GLOBAL = 4
COUNT = 300


def config(url: str, log: Path) -> str:
    step = f'"{sys.executable}", "-S", "{STEP}", "{log}"'
    return f"""
[database]
url = "{url}"

[daemon]
poll_interval = "500ms"
shutdown_grace = "10s"
kill_grace = "1s"
heartbeat_interval = "500ms"
instance_ttl = "3s"

[gate]
global = {GLOBAL}

[runners.py]
type = "exec"

[tasks.one]
steps = [{{ name = "s1", runner = "py", args = [{step}, "{{n}}", "{{secs}}"] }}]
"""


def _count(url: str, instance_id: str, query: str) -> int:
    """A count about one instance (`:'id'`), read straight from the database."""
    result = subprocess.run(
        ["psql", url, "-tA", "-v", f"id={instance_id}"],
        input=query,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip() or 0)


def _held_by(url: str, instance_id: str) -> int:
    """Gate rows the instance holds."""
    query = "SELECT count(*) FROM gates WHERE released_at IS NULL AND instance_id = :'id'"
    return _count(url, instance_id, query)


def _running_on(url: str, instance_id: str) -> int:
    """Dispatches the instance has claimed and not finished."""
    query = (
        "SELECT count(*) FROM dispatches"
        " WHERE status IN ('planning', 'running') AND instance_id = :'id'"
    )
    return _count(url, instance_id, query)


def _finished(daemon: Any) -> int:
    return sum(status in FINAL for status in daemon.statuses().values())


def _reaped_events(daemons: list[Any]) -> list[dict[str, Any]]:
    return [e for d in daemons for e in d.events() if e.get("event") == "dead_instances_reaped"]


def test_three_daemons_share_one_global_cap_and_survive_a_sigkill(
    tmp_path: Path, make_daemon: Any, pg_database: str
) -> None:
    log = tmp_path / "steps.log"
    daemons = [make_daemon(config(pg_database, log)) for _ in range(3)]
    lines = [
        json.dumps({"task": "one", "params": {"n": f"d{n}", "secs": "0.2"}}) for n in range(COUNT)
    ]
    submitted = daemons[0].cli("submit", "--batch", "-", stdin="\n".join(lines) + "\n")
    assert submitted.returncode == 0, submitted.stderr
    started = time.time()
    for daemon in daemons:
        daemon.start()

    wait_until(lambda: _finished(daemons[0]) >= COUNT // 3, timeout=240, interval=0.2)
    victim, survivors = daemons[2], daemons[:2]
    victim_id = victim.wait_for_event("daemon_started")["instance_id"]
    # Kill it while it holds a slot, so that there is something to reap.
    wait_until(lambda: _held_by(pg_database, victim_id) >= 1, timeout=60, interval=0.005)
    killed_at = time.time()
    victim.kill()
    # What the dead daemon left behind, frozen from now on until a survivor reaps it
    # (a step may have ended between the poll above and the kill).
    held_at_kill = _held_by(pg_database, victim_id)
    running_at_kill = _running_on(pg_database, victim_id)
    wait_until(lambda: _finished(daemons[0]) == COUNT, timeout=300, interval=0.5)
    finished_at = time.time()
    for daemon in survivors:
        assert daemon.stop() == 0

    records = read_records(log)
    peak = peak_concurrency(records, killed_at=killed_at)
    assert peak == GLOBAL
    rows = daemons[0].cli_json("list", "--limit", "100000")
    assert len(rows) == COUNT
    assert {row["status"] for row in rows} == {"succeeded"}
    ended = Counter(r.label for r in records if r.kind == "end")
    assert set(ended) == {f"d{n}" for n in range(COUNT)}
    # No step ran to completion twice, except across the kill: a step of the victim
    # that ended just before it, before its success was recorded, runs again (at least
    # once). Such a first end is in the moment before the kill.
    twice = sorted(label for label, n in ended.items() if n > 1)
    for label in twice:
        first_end = min(r.at for r in records if r.kind == "end" and r.label == label)
        assert killed_at - 1.0 <= first_end <= killed_at + 0.1, (label, first_end, killed_at)
    assert len(twice) <= GLOBAL
    gates = daemons[0].cli_json("gates")
    assert gates["rows"]["held"] == 0

    reaped = _reaped_events(survivors)
    assert held_at_kill + running_at_kill >= 1, "the victim held nothing when it was killed"
    assert reaped, "no surviving daemon reaped the killed one"
    assert sum(e["slots_released"] for e in reaped) == held_at_kill
    assert sum(e["dispatches_requeued"] for e in reaped) == running_at_kill
    first_reap = min(_epoch(e["timestamp"]) for e in reaped)
    starts = sum(r.kind == "start" for r in records)
    print(
        f"\nscaling figures: {COUNT} dispatches, 3 daemons, global={GLOBAL}: "
        f"peak {peak}, step starts {starts}, wall {finished_at - started:.1f}s, "
        f"kill -> slots reaped {first_reap - killed_at:.1f}s (instance_ttl 3s), "
        f"reaped {[(e['slots_released'], e['dispatches_requeued']) for e in reaped]}, "
        f"ran twice across the kill {twice}"
    )


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
