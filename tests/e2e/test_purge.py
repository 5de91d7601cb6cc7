"""Purge against a running daemon process: the run after start, `dispatcher purge`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import wait_until

pytestmark = pytest.mark.slow

COUNT = 20

CONFIG = """
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "200ms"

[runners.noop]
type = "noop"

[tasks.greet]
steps = [{ name = "a", runner = "noop", args = ["{who}"] }]

[purge]
gate_retention = "0"        # every released row is purgeable at once
startup_delay = "0s"
"""


def succeeded(daemon: Any) -> int:
    return sum(status == "succeeded" for status in daemon.statuses().values())


def test_purge_from_the_cli_while_the_daemon_dispatches(make_daemon: Any) -> None:
    daemon = make_daemon(CONFIG)
    daemon.start()
    first = daemon.wait_for_event("gates_purged")  # the run shortly after start
    assert (first["deleted"], first["batches"]) == (0, 0)
    assert first["instance_id"] and first["level"] == "info"
    # APScheduler's chatter ("Added job", "Running job") is debug: not in an info log.
    assert not [e for e in daemon.events() if e.get("logger", "").startswith("apscheduler")]

    lines = "".join(
        json.dumps({"task": "greet", "params": {"who": str(n)}}) + "\n" for n in range(COUNT)
    )
    assert daemon.cli("submit", "--batch", "-", stdin=lines).returncode == 0
    wait_until(lambda: succeeded(daemon) == COUNT)
    assert daemon.cli_json("gates")["rows"] == {"held": 0, "released": COUNT, "purgeable": COUNT}

    dry = daemon.cli_json("purge", "--dry-run")
    assert dry["dry_run"] is True and dry["gates"]["purgeable"] == COUNT
    assert daemon.cli_json("gates")["rows"]["released"] == COUNT  # nothing deleted

    done = daemon.cli_json("purge")
    assert done["gates"]["deleted"] == COUNT and done["gates"]["batches"] == 1
    assert done["dispatches"]["deleted"] == 0  # retained for 30 days
    assert daemon.cli_json("gates")["rows"] == {"held": 0, "released": 0, "purgeable": 0}

    # The daemon kept going: a new dispatch still runs, and its slot row is there.
    again = daemon.cli("submit", "greet", "--param", "who=again", "--wait")
    assert again.returncode == 0, again.stderr
    assert daemon.cli_json("gates")["rows"]["released"] == 1
    assert succeeded(daemon) == COUNT + 1

    text = daemon.cli("purge")
    assert text.returncode == 0 and text.stdout.startswith("purged 1 gate rows released before")
    assert daemon.stop() == 0
    assert [e for e in daemon.events() if e["level"] in ("error", "critical")] == []
