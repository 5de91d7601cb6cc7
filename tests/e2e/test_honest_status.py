"""A dispatch that waits for a gate says so, with the gate's name, everywhere a person
or a program looks: `status`, `list`, `show`, the API. Failures show their output."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import wait_until
from .httphelp import api_url, call

pytestmark = pytest.mark.slow

HOLD = Path(__file__).with_name("hold.py")


def config(tmp_path: Path) -> str:
    hold = f'"{sys.executable}", "{HOLD}", "{tmp_path}/release-{{name}}"'
    fail = f'"{sys.executable}", "-c", "import sys; print(\'checking\'); sys.exit(\'disk full\')"'
    return f"""
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "100ms"
shutdown_grace = "0s"
heartbeat_interval = "300ms"
instance_ttl = "2s"

[gate]
global = 3

[runners.py]
type = "exec"
concurrency = 1

[tasks.held]
steps = [{{ name = "hold", runner = "py", args = [{hold}] }}]

[tasks.fails]
steps = [{{ name = "boom", runner = "py", args = [{fail}] }}]

[api]
listen = "127.0.0.1:0"
"""


def test_waiting_for_a_runner_place_is_shown_as_waiting_with_the_gate(
    tmp_path: Path, make_daemon: Any
) -> None:
    daemon = make_daemon(config(tmp_path))
    daemon.start()
    url = api_url(daemon)
    daemon.cli("submit", "fails")
    daemon.wait_status(1, "failed")
    daemon.cli("submit", "held", "--param", "name=a")
    daemon.cli("submit", "held", "--param", "name=b")
    wait_until(lambda: daemon.cli_json("show", "3")["waiting_for"] == "runner:py")
    wait_until(lambda: daemon.cli_json("show", "2")["attempts"] != [])

    data = daemon.cli_json("status")
    assert [(d["id"], d["waiting_for"]) for d in data["in_flight"]] == [
        (2, None),
        (3, "runner:py"),
    ]
    assert data["in_flight_count"] == 2
    assert data["gates"][0]["held"] == 2 <= data["gates"][0]["capacity"]
    text = daemon.cli("status").stdout
    assert "queue     0 queued, 2 in flight (global 2/3), 0 succeeded, 1 failed" in text
    assert "     3 held             waiting for runner:py at step 1/1 hold" in text
    assert "| disk full" in text and "| checking" in text  # the failure's output tail

    listed = daemon.cli("list").stdout.splitlines()
    assert listed[0].split() == ["ID", "STATUS", "TASK", "CREATED", "ERROR"]
    assert listed[1].split()[:3] == ["3", "waiting", "(runner:py)"]
    assert listed[2].split()[:2] == ["2", "running"]
    shown = daemon.cli("show", "3").stdout
    assert shown.startswith("dispatch 3  task held  status waiting (runner:py)")
    assert daemon.cli_json("show", "3")["attempts"] == []  # no attempt while it waits
    assert call("GET", f"{url}/v1/dispatches/3").json()["waiting_for"] == "runner:py"
    assert call("GET", f"{url}/v1/dispatches/2").json()["waiting_for"] is None

    failed = daemon.cli("show", "1").stdout
    assert "      | checking\n      | disk full\n" in failed  # show's output tail, without --json

    (tmp_path / "release-a").touch()
    (tmp_path / "release-b").touch()
    daemon.wait_status(3, "succeeded")
    assert daemon.cli_json("show", "3")["waiting_for"] is None
    assert daemon.stop() == 0
