"""Every `jq` recipe in the documentation works on a real stream: the daemon's lines
among the journal's own (systemd's messages about the unit, a plain-text error)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.recipes import SOURCES, documented_recipes

from .conftest import STEP, wait_until
from .test_daemon import config

pytestmark = pytest.mark.slow

UNIT = "dispatcher.service - dispatcher: Plan -> Execute daemon with a concurrency gate"
JOURNAL_HEAD = [f"Starting {UNIT}...", f"Started {UNIT}."]
JOURNAL_TAIL = [
    f"Stopping {UNIT}...",
    "dispatcher.service: Deactivated successfully.",
    f"Stopped {UNIT}.",
    "dispatcher.service: Consumed 1.843s CPU time.",
    "-- Boot 5d2c6b2f8a0e4bd1a3c7f1c1f0a9e2b4 --",
]
"""What `journalctl -o cat -u dispatcher` shows around the daemon's own lines."""

FAILING = """
[tasks.fails]
steps = [{{ name = "boom", runner = "py", args = ["{python}", "{step}", "{log}", "x", "0", "3"] }}]
"""


@pytest.fixture(scope="module")
def jq() -> str:
    path = shutil.which("jq")
    if path is None:
        pytest.skip("jq is not installed (.ci/run installs it)")
    return path


def _captured_stream(tmp_path: Path, make_daemon: Any) -> Path:
    text = config(tmp_path, global_=2) + FAILING.format(
        python=sys.executable, step=STEP, log=tmp_path / "steps.log"
    )
    daemon = make_daemon(text)
    daemon.start()
    daemon.cli("submit", "one", "--param", "n=1", "--param", "secs=0")
    daemon.cli("submit", "fails")
    wait_until(lambda: [e for e in daemon.events() if e.get("event") == "dispatch_finished"][1:])
    assert daemon.proc is not None
    daemon.config.write_text("[gate]\nglobal = 0\n")  # a reload refused: an error event
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_event("config_reload_failed")
    assert daemon.stop() == 0
    stream = tmp_path / "journal.txt"
    lines = [*JOURNAL_HEAD, *daemon.log_path.read_text().splitlines(), *JOURNAL_TAIL]
    stream.write_text("\n".join(lines) + "\n")
    return stream


def test_every_documented_recipe_reads_the_stream(
    tmp_path: Path, make_daemon: Any, jq: str
) -> None:
    recipes = documented_recipes()
    assert {recipe.source for recipe in recipes} == set(SOURCES)
    stream = _captured_stream(tmp_path, make_daemon)
    outputs = {}
    for recipe in recipes:
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", f"cat {stream} | {recipe.filters}"],
            capture_output=True,
            text=True,
        )
        assert (done.returncode, done.stderr) == (0, ""), f"{recipe.source}: {recipe.command}"
        outputs[recipe.command] = done.stdout
    failures = [out for cmd, out in outputs.items() if '.status != "succeeded"' in cmd]
    assert failures and all('"status":"failed"' in out for out in failures)
    refused = [out for cmd, out in outputs.items() if "config_reload_failed" in cmd]
    assert refused and all("gate.global" in out for out in refused)
